"""The message that travels stage to stage (as an ObjectRef, never through the driver).

A small header (which sequences, where they start, how many new tokens each) and one payload:
token ids into the first stage, packed hidden states (N, dim) between stages, sampled tokens
out of the last one. The messages issue extends it with codec, checksum and attempt fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.sampling import SamplingParams, TokenLogprob


@dataclass(slots=True)
class Envelope:
    seq_ids: list[str]  # B sequences in this micro-batch
    starts: list[int]  # (B,) tokens each sequence already has cached
    lengths: list[int]  # (B,) new tokens each sequence brings this step
    step: int  # the router's step counter for this lane
    tokens: list[int] | None = None  # (N,) packed new token ids: into the first stage
    hidden: torch.Tensor | None = None  # (N, dim) packed hidden states: between stages
    params: list[SamplingParams] | None = None  # (B,) sampling options, read by the last stage
    release: list[str] = field(default_factory=list)  # sequences whose caches to free first
    sampled: list[int] | None = None  # (B,) next tokens: out of the last stage
    logprobs: list[TokenLogprob | None] | None = None  # (B,) when asked for

    def header(self) -> str:
        shape = tuple(self.hidden.shape) if self.hidden is not None else (len(self.tokens or ()),)
        return f"step {self.step}: {len(self.seq_ids)} seqs, payload {shape}"
