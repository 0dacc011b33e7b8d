"""The message that travels stage to stage (as an ObjectRef, never through the driver).

A small header (which sequences, where they start, how many new tokens each) and one payload:
token ids into the first stage, packed hidden states (N, dim) between stages, sampled tokens
out of the last one. The messages issue extends it with codec, checksum and attempt fields.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.sampling import SamplingParams, TokenLogprob


@dataclass(slots=True)
class Envelope:
    seq_ids: list[str]  # B sequences in this micro-batch
    starts: list[int]  # (B,) tokens each sequence already has cached
    lengths: list[int]  # (B,) new tokens each sequence brings this step
    step: int  # the router's step counter for this lane
    tokens: list[int] | None = None  # (N,) packed new token ids: into the first stage
    payload: np.ndarray | None = None  # (N, dim) packed hidden states between stages, as numpy
    dtype: str = ""  # torch dtype of the payload ("bfloat16" travels as its int16 bits)
    params: list[SamplingParams] | None = None  # (B,) sampling options, read by the last stage
    release: list[str] = field(default_factory=list)  # sequences whose caches to free first
    push: bool = False  # each stage calls the next itself (push mode) instead of the router
    hops: list[Any] = field(default_factory=list)  # push mode: actor handles of the stages still to visit
    sent_at: float = 0.0  # time.time() when the producer sent it (inbound wait = start - sent_at)
    trace: list[tuple[int, int, float, float]] = field(default_factory=list)  # (stage, replica, inbound_ms, compute_ms) per hop so far
    sampled: list[int] | None = None  # (B,) next tokens: out of the last stage
    logprobs: list[TokenLogprob | None] | None = None  # (B,) when asked for

    def set_hidden(self, t: torch.Tensor) -> None:
        """Numpy travels zero-copy through Ray's object store (out-of-band pickle buffers)."""
        t = t.detach().contiguous().cpu()
        self.dtype = str(t.dtype).removeprefix("torch.")
        self.payload = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

    def hidden(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The payload as a tensor: read-only shared memory when it came from the object store."""
        with warnings.catch_warnings():  # from_numpy warns on read-only arrays; we never write
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(self.payload)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(device)
