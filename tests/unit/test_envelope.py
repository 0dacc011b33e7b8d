"""The envelope's payload round trip (no Ray): every dtype, empty and non-contiguous tensors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from actors.envelope import Envelope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (0, 64)])
def test_hidden_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    t = torch.randn(shape, dtype=torch.float32).to(dtype)
    env = Envelope(["a"], [0], [shape[0]], 1)
    env.set_hidden(t)
    assert isinstance(env.payload, np.ndarray)
    back = pickle.loads(pickle.dumps(env, protocol=5)).hidden()
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_non_contiguous_tensor() -> None:
    t = torch.randn(64, 8).t()  # (8, 64), not contiguous
    env = Envelope(["a"], [0], [8], 1)
    env.set_hidden(t)
    assert torch.equal(env.hidden(), t)
