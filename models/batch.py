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
    # set by KVCache.prepare:
    block_table: torch.Tensor | None = None  # (B, blocks) each sequence's KV blocks, padded with block 0
    token_block: torch.Tensor | None = None  # (N,) the block each packed token's keys and values go to
    token_offset: torch.Tensor | None = None  # (N,) the position within that block

    @classmethod
    def build(cls, seq_ids: Sequence[str], starts: Sequence[int], lengths: Sequence[int]) -> Batch:
        # plain Python, then one tensor per field: a decode step's handful of ints costs ~5 small
        # tensors instead of a dozen torch ops (this runs on every stage at every step)
        starts, lengths = [int(s) for s in starts], [int(n) for n in lengths]
        token_seq = [i for i, n in enumerate(lengths) for _ in range(n)]  # (N,)
        token_t = [t for n in lengths for t in range(n)]  # (N,)
        last, ends = 0, []
        for n in lengths:
            last += n
            ends.append(last - 1)
        return cls(
            seq_ids=list(seq_ids),
            starts=torch.tensor(starts, dtype=torch.long),
            lengths=torch.tensor(lengths, dtype=torch.long),
            token_seq=torch.tensor(token_seq, dtype=torch.long),
            token_t=torch.tensor(token_t, dtype=torch.long),
            positions=torch.tensor([starts[i] + t for i, t in zip(token_seq, token_t)], dtype=torch.long),
            last_token=torch.tensor(ends, dtype=torch.long),
        )

    def to(self, device: torch.device) -> Batch:
        if torch.device(device) == self.starts.device:
            return self
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Batch(**moved)

    @property
    def decode_only(self) -> bool:
        return bool((self.lengths == 1).all())
