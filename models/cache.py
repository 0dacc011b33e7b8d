"""KV cache for many sequences of different lengths on one stage (continuous batching).

Each sequence owns a *slot*; per layer, keys and values live in one growable tensor
(slots, n_kv, max_len, hd). Sequences join (a new slot) and leave (`free`) between steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from models.errors import CacheMissError

if TYPE_CHECKING:
    from models.batch import Batch


class KVCache:
    def __init__(self, layer_ids: Sequence[int], n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, slots: int = 4, length: int = 64) -> None:
        self.layer_ids = list(layer_ids)
        self.n_kv, self.hd, self.dtype, self.device = n_kv, head_dim, dtype, device
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._alloc(slots, length)
        self.slot_of: dict[str, int] = {}  # sequence id -> slot
        self.length_of: dict[str, int] = {}  # sequence id -> tokens cached
        self._free_slots: list[int] = list(range(slots))[::-1]

    def _alloc(self, slots: int, length: int) -> None:
        self._slots, self._len = slots, length
        for i in self.layer_ids:
            for store in (self.k, self.v):
                new = torch.zeros(slots, self.n_kv, length, self.hd, dtype=self.dtype, device=self.device)
                old = store.get(i)
                if old is not None:
                    new[: old.shape[0], :, : old.shape[2]] = old
                store[i] = new

    def _new_slot(self, seq_id: str) -> None:
        if not self._free_slots:
            grow = max(4, self._slots)
            self._free_slots = list(range(self._slots + grow - 1, self._slots - 1, -1))
            self._alloc(self._slots + grow, self._len)
        self.slot_of[seq_id] = self._free_slots.pop()

    def prepare(self, b: Batch) -> None:
        """Give each sequence a slot, check its step follows its cache, grow storage; sets b.slots."""
        slots = []
        for sid, start, n in zip(b.seq_ids, b.starts.tolist(), b.lengths.tolist()):
            have = self.length_of.get(sid)
            if have is None and start > 0 or have is not None and start > have:
                raise CacheMissError(
                    f"sequence {sid!r}: step starts at position {start} but this stage caches "
                    f"{have or 0} tokens; rebuild its cache from the sequence history"
                )
            if have is None:
                self._new_slot(sid)
            # start < have rewinds: the step is re-applied over the same positions (idempotent)
            self.length_of[sid] = start + n
            slots.append(self.slot_of[sid])
        need = int((b.starts + b.lengths).max())
        if need > self._len:
            self._alloc(self._slots, max(need, 2 * self._len))
        b.slots = torch.as_tensor(slots, dtype=torch.long, device=self.device)

    def write(self, layer: int, b: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (N, KV, hd) for the packed tokens of this step
        slot_tok = b.slots[b.token_seq]
        self.k[layer][slot_tok, :, b.positions] = k
        self.v[layer][slot_tok, :, b.positions] = v

    def read(self, layer: int, b: Batch, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, KV, length, hd) keys and values of the batch's sequences."""
        return self.k[layer][b.slots, :, :length], self.v[layer][b.slots, :, :length]

    def export(self, seq_id: str, start: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of positions start.. of one sequence, per layer: (KV, n, hd) each (a copy)."""
        slot, end = self.slot_of[seq_id], self.length_of[seq_id]
        return {i: (self.k[i][slot, :, start:end].clone(), self.v[i][slot, :, start:end].clone())
                for i in self.layer_ids}

    def load(self, seq_id: str, start: int, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Adds exported positions start.. of a sequence; positions already held are kept. Returns its length."""
        have = self.length_of.get(seq_id, 0)
        n = next(iter(kv.values()))[0].shape[1] if kv else 0
        if start > have:
            raise CacheMissError(f"sequence {seq_id!r}: a copy starts at position {start} but only {have} are held")
        if start + n <= have:
            return have
        if seq_id not in self.slot_of:
            self._new_slot(seq_id)
        if start + n > self._len:
            self._alloc(self._slots, max(start + n, 2 * self._len))
        slot, skip = self.slot_of[seq_id], have - start
        for i, (k, v) in kv.items():
            self.k[i][slot, :, have:start + n] = k[:, skip:].to(self.device, self.dtype)
            self.v[i][slot, :, have:start + n] = v[:, skip:].to(self.device, self.dtype)
        self.length_of[seq_id] = start + n
        return start + n

    def rewind(self, seq_id: str, length: int) -> None:
        """Forget positions length.. of a sequence (rejected draft tokens): what `prepare` does when
        a step starts before the cache's end, done now so `export` and `tokens_held` see only kept ones."""
        have = self.length_of.get(seq_id, 0)
        if not 0 <= length <= have:
            raise CacheMissError(f"sequence {seq_id!r}: cannot rewind to {length}, "
                                 f"only {have} positions are held")
        self.length_of[seq_id] = length

    def free(self, seq_ids: Iterable[str]) -> None:
        for sid in seq_ids:
            slot = self.slot_of.pop(sid, None)
            self.length_of.pop(sid, None)
            if slot is not None:
                self._free_slots.append(slot)

    def tokens_held(self) -> int:
        return sum(self.length_of.values())

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self.slot_of
