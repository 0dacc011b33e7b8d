"""Where each packed token of a step belongs (`Batch`): shared by the model, the KV cache and the stages."""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def long_tensor(ints: Sequence[int]) -> torch.Tensor:
    """A CPU int64 tensor of Python ints, 3-5x faster than `torch.tensor(list)` (which inspects each element:
    ~40 us for a batch of 64's block tables, on every stage at every step); it owns its buffer."""
    if not ints:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", ints), dtype=torch.long)


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
    token_slot: torch.Tensor | None = None  # (N,) where each packed token's keys and values go: block x size + offset
    # (starts, lengths, positions) as Python ints, kept by `build` (no device sync to read them back)
    host: tuple[list[int], list[int], list[int]] | None = field(default=None, repr=False)
    dims: tuple[int, int, int] | None = field(default=None, repr=False)  # `span()`, once computed
    packed: torch.Tensor | None = field(default=None, repr=False)  # (3B + 3N,) the tensor `build` sliced

    @classmethod
    def build(cls, seq_ids: Sequence[str], starts: Sequence[int], lengths: Sequence[int]) -> Batch:
        # plain Python, then one tensor whose slices are the fields: a decode step's handful of ints
        # costs one small tensor instead of a dozen torch ops (this runs on every stage at every step)
        starts, lengths = [int(s) for s in starts], [int(n) for n in lengths]
        token_seq = [i for i, n in enumerate(lengths) for _ in range(n)]  # (N,)
        token_t = [t for n in lengths for t in range(n)]  # (N,)
        positions = [starts[i] + t for i, t in zip(token_seq, token_t)]  # (N,)
        last, ends = 0, []
        for n in lengths:
            last += n
            ends.append(last - 1)
        B, N = len(lengths), len(token_seq)
        a = long_tensor(starts + lengths + ends + token_seq + token_t + positions)
        return cls._sliced(list(seq_ids), a, B, N, (starts, lengths, positions))

    @classmethod
    def _sliced(cls, seq_ids: list[str], a: torch.Tensor, B: int, N: int,
                host: tuple[list[int], list[int], list[int]]) -> Batch:
        return cls(seq_ids=seq_ids, starts=a[:B], lengths=a[B:2 * B], last_token=a[2 * B:3 * B],
                   token_seq=a[3 * B:3 * B + N], token_t=a[3 * B + N:3 * B + 2 * N], positions=a[3 * B + 2 * N:],
                   host=host, packed=a)

    def host_lists(self) -> tuple[list[int], list[int], list[int]]:
        """(starts, lengths, positions) as Python ints (no device sync where `build` made them)."""
        if self.host is not None:
            return self.host
        return self.starts.tolist(), self.lengths.tolist(), self.positions.tolist()

    def to(self, device: torch.device) -> Batch:
        if torch.device(device) == self.starts.device:
            return self
        if self.packed is not None and self.host is not None and self.block_table is None:  # one copy, not six
            return Batch._sliced(self.seq_ids, self.packed.to(device), len(self.seq_ids), self.token_seq.numel(),
                                 self.host)
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items() if k != "packed"}
        return Batch(**moved)

    def span(self) -> tuple[int, int, int]:
        """(B, T, L): sequences, the most new tokens of one (attention's query rows) and the longest
        cached length after the step (its key columns)."""
        if self.dims is None:  # once per step, not once per layer
            starts, lengths, _ = self.host_lists()
            self.dims = len(lengths), max(lengths), max(s + n for s, n in zip(starts, lengths))
        return self.dims

    @property
    def decode_only(self) -> bool:
        return bool((self.lengths == 1).all())
