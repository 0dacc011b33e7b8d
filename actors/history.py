"""Each sequence's output history at a stage: the hidden states it sent on, position by position.

A stage keeps what it produced for every live sequence so that it can resend any message
(retransmission after a checksum failure) and, in the fault-tolerance issue, hand a replacement
of the next stage the inputs it needs to rebuild its KV cache. Pure torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from models.errors import CacheMissError


class OutputHistory:
    """A step's outputs are copied once (one tensor, however many sequences it carried); each sequence
    keeps (step outputs, row, rows) references until 64 of them are joined into its own tensor: on a GPU,
    one copy kernel a step instead of one per sequence."""

    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}  # seq id -> (T, dim) outputs for positions first..first+T-1
        self._chunks: dict[str, list[tuple[torch.Tensor, int, int]]] = {}  # since the last compaction: (y, row, n)
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
        kept = y.detach().clone()  # (N, dim): the caller's tensor may be reused
        offset = 0
        for sid, start, n in zip(seq_ids, starts, lengths):
            if sid not in self._len or start < self.first(sid):
                self.free([sid])  # a new sequence (maybe past a cached prefix), or a rebuild from before its first
                self._first[sid], self._len[sid] = start, 0
            have = self.length(sid)
            if start < have:  # a rebuild rewrote these positions
                self.truncate(sid, start)
            elif start > have:
                raise CacheMissError(f"output history of {sid!r} has {have} positions, a step starts at {start}")
            chunks = self._chunks.setdefault(sid, [])
            chunks.append((kept, offset, n))
            self._len[sid] += n
            if len(chunks) >= 64:
                self._compact(sid)
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
            self._rows.pop(sid, None)
            self._chunks.pop(sid, None)
            self._first.pop(sid, None)
            self._len.pop(sid, None)

    def _compact(self, sid: str) -> torch.Tensor | None:
        chunks = self._chunks.pop(sid, [])
        base = self._rows.get(sid)
        if chunks:
            parts = [y[row:row + n] for y, row, n in chunks]
            base = torch.cat(([base] if base is not None else []) + parts)
            self._rows[sid] = base
        return base

    def truncate(self, sid: str, n: int) -> None:
        """Keeps positions ..n-1."""
        rows = self._compact(sid)
        if rows is not None:
            self._rows[sid] = rows[:max(0, n - self.first(sid))]
            self._len[sid] = self._rows[sid].shape[0]
