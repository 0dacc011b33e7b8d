"""The envelope's message survives pickling as Ray does it (no Ray): every dtype, empty and strided tensors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from actors.wire import Envelope, Header, LinkCodec


def header(n: int) -> Header:
    return Header(kind="step", step=3, msg_id=7, attempt=0, sender="stage-0", seq_ids=["a"], starts=[0],
                  lengths=[n], release=["old"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (0, 64)])
def test_message_round_trip_through_pickle_is_bit_exact(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    t = torch.randn(shape, dtype=torch.float32).to(dtype)
    env = Envelope.seal(header(shape[0]), t, LinkCodec(), None)
    assert isinstance(env.wire, np.ndarray) and env.wire.dtype == np.uint8  # out-of-band, zero-copy in Ray
    buffers: list = []
    data = pickle.dumps(env, protocol=5, buffer_callback=buffers.append)
    assert buffers  # the payload travels as an out-of-band buffer, not inside the pickle
    h, back = pickle.loads(data, buffers=buffers).open(None)
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    assert (h.seq_ids, h.lengths, h.release, h.msg_id) == (["a"], [shape[0]], ["old"], 7)


def test_non_contiguous_tensor() -> None:
    t = torch.randn(64, 8).t()  # (8, 64), not contiguous
    _, back = Envelope.seal(header(8), t, LinkCodec(), None).open(None)
    assert torch.equal(back, t)
