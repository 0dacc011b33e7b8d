"""Where each packed token of a step belongs (`Batch`): shared by the model, the KV cache and the stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Where each packed token belongs: built once per step and shared by every layer."""

    seq_ids: list[str]  # B sequence ids
    starts: torch.Tensor  # (B,) cache length of each sequence before this step
    lengths: torch.Tensor  # (B,) new tokens per sequence this step (>= 1)
    token_seq: torch.Tensor  # (N,) which sequence each packed token belongs to
    token_t: torch.Tensor  # (N,) index of each token within its sequence's new tokens
    positions: torch.Tensor  # (N,) absolute position of each token
    last_token: torch.Tensor  # (B,) packed index of each sequence's last new token
    slots: torch.Tensor | None = None  # (B,) cache slot of each sequence, set by KVCache.prepare

    @classmethod
    def build(cls, seq_ids: Sequence[str], starts: Sequence[int], lengths: Sequence[int]) -> Batch:
        starts_t = torch.as_tensor(list(starts), dtype=torch.long)
        lengths_t = torch.as_tensor(list(lengths), dtype=torch.long)
        token_seq = torch.repeat_interleave(torch.arange(len(lengths_t)), lengths_t)  # (N,)
        offsets = torch.cumsum(lengths_t, 0) - lengths_t  # (B,) first packed index per sequence
        token_t = torch.arange(int(lengths_t.sum())) - offsets[token_seq]  # (N,)
        return cls(
            seq_ids=list(seq_ids),
            starts=starts_t,
            lengths=lengths_t,
            token_seq=token_seq,
            token_t=token_t,
            positions=starts_t[token_seq] + token_t,
            last_token=offsets + lengths_t - 1,
        )

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Batch(**moved)

    @property
    def decode_only(self) -> bool:
        return bool((self.lengths == 1).all())
