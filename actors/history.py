"""Each sequence's output history at a stage: the hidden states it sent on, position by position.

A stage keeps what it produced for every live sequence so that it can resend any message
(retransmission after a checksum failure) and, in the fault-tolerance issue, hand a replacement
of the next stage the inputs it needs to rebuild its KV cache. Pure torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from actors.wire.buffers import serial_clone
from models.errors import CacheMissError


BLOCK_ROWS = 64  # a sequence's rows are joined into a tensor of its own this many at a time


class OutputHistory:
    """A step's outputs are copied once (one tensor, however many sequences it carried); each sequence
    keeps (step outputs, row, rows) references until it has 64 rows there, which are then joined into
    a block of its own (the step tensors can go): on a GPU, one copy kernel a step instead of one per
    sequence, and no growing tensor copied again at every join (that cost O(T^2) a sequence)."""

    def __init__(self) -> None:
        self._blocks: dict[str, list[torch.Tensor]] = {}  # seq id -> its own (rows, dim) tensors, in position order
        self._chunks: dict[str, list[tuple[torch.Tensor, int, int]]] = {}  # rows after the blocks: (y, row, n)
        self._pending: dict[str, int] = {}  # seq id -> rows in its chunks
        self._first: dict[str, int] = {}  # seq id -> its first position kept (> 0: it began on a cached prefix)
        self._len: dict[str, int] = {}  # seq id -> positions kept

    def first(self, seq_id: str) -> int:
        """The first position kept: a sequence that began on cached prefix blocks has no outputs before it."""
        return self._first.get(seq_id, 0)

    def length(self, seq_id: str) -> int:
        """One past the last position kept."""
        return self.first(seq_id) + self._len.get(seq_id, 0)

    def record(self, seq_ids: list[str], starts: list[int], lengths: list[int], y: torch.Tensor) -> None:
        """Stores packed outputs y (N, dim) for positions starts[i] .. starts[i] + lengths[i] - 1."""
        kept = serial_clone(y.detach())  # (N, dim): the caller's tensor may be reused
        offset = 0
        firsts, lens, chunks_of, pending = self._first, self._len, self._chunks, self._pending
        for sid, start, n in zip(seq_ids, starts, lengths):
            have, first = lens.get(sid), firsts.get(sid, 0)
            if have is None or start < first:
                self.free([sid])  # a new sequence (maybe past a cached prefix), or a rebuild from before its first
                firsts[sid], lens[sid], have, first = start, 0, 0, start
            if start < first + have:  # a rebuild rewrote these positions
                self.truncate(sid, start)
            elif start > first + have:
                raise CacheMissError(f"output history of {sid!r} has {first + have} positions, a step starts at {start}")
            chunks = chunks_of.get(sid)
            if chunks is None:
                chunks = chunks_of[sid] = []
            chunks.append((kept, offset, n))
            lens[sid] += n
            pending[sid] = rows = pending.get(sid, 0) + n
            if rows >= BLOCK_ROWS:
                self._seal(sid)
            offset += n

    def gather(self, seq_ids: list[str], starts: list[int], lengths: list[int]) -> torch.Tensor:
        """The packed outputs (N, dim) those positions had, e.g. to resend a message."""
        parts = []
        for sid, start, n in zip(seq_ids, starts, lengths):
            rows, first = self._compact(sid), self.first(sid)
            if rows is None or start < first or start + n > first + rows.shape[0]:
                held = "none" if rows is None else f"{first}..{first + rows.shape[0] - 1}"
                raise CacheMissError(f"output history of {sid!r} holds positions {held}, not {start}..{start + n - 1}")
            parts.append(rows[start - first:start - first + n])
        return torch.cat(parts) if parts else torch.empty(0)

    def free(self, seq_ids: Iterable[str]) -> None:
        for sid in seq_ids:
            self._blocks.pop(sid, None)
            self._chunks.pop(sid, None)
            self._pending.pop(sid, None)
            self._first.pop(sid, None)
            self._len.pop(sid, None)

    def _seal(self, sid: str) -> None:
        """The sequence's chunks, joined into one block of its own."""
        chunks = self._chunks.pop(sid, None)
        self._pending.pop(sid, None)
        if chunks:
            parts = [y[row:row + n] for y, row, n in chunks]
            self._blocks.setdefault(sid, []).append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())

    def _compact(self, sid: str) -> torch.Tensor | None:
        """All the sequence's rows as one tensor (kept as its only block), or None."""
        self._seal(sid)
        blocks = self._blocks.get(sid)
        if not blocks:
            return None
        if len(blocks) > 1:
            blocks[:] = [torch.cat(blocks)]
        return blocks[0]

    def truncate(self, sid: str, n: int) -> None:
        """Keeps positions ..n-1."""
        rows = self._compact(sid)
        if rows is not None:
            kept = rows[:max(0, n - self.first(sid))]
            self._blocks[sid] = [kept]
            self._len[sid] = kept.shape[0]
