"""Paged KV cache of one stage: a fixed pool of blocks, a block table per sequence (vLLM's layout).

Per layer, keys and values live in one preallocated tensor (num_blocks, block_size, 2, n_kv, hd)
(keys at [:, :, 0], values at [:, :, 1]: one gather and one scatter a layer and step);
the OS commits a block's pages when it is first used (it is zeroed then), and the pool never grows
or shrinks, so a stage holds at most the pool's memory whatever its sequences do. A
sequence owns a list of block ids; joining, growing and leaving take and give back blocks
without copying. Attention reads a batch's blocks through its table (`read`: one gather).

Prefix caching: once a block is full of tokens no later step may rewrite (not speculative
drafts), it is registered under the hash of its contents and prefix (`models.blocks`); when its
sequence ends it stays cached at count 0 until evicted least-recently-used. `pin_prefix` lets a
new sequence start on the cached blocks of its prompt's longest cached prefix, shared read-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from models.batch import Batch, long_tensor
from models.blocks import ROOT, BlockAllocator, block_hash
from models.errors import CacheMissError

DEFAULT_BLOCK = 16  # tokens per block


class KVCache:
    def __init__(self, layer_ids: Sequence[int], n_kv: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_tokens: int, block_size: int = DEFAULT_BLOCK,
                 prefix_caching: bool = True) -> None:
        self.layer_ids = list(layer_ids)
        self.n_kv, self.hd, self.dtype, self.device = n_kv, head_dim, dtype, device
        self.bs, self.prefix_caching = block_size, prefix_caching
        num_blocks = max(1, -(-num_tokens // block_size))
        shape = (num_blocks, block_size, 2, n_kv, head_dim)
        self.blocks = BlockAllocator(num_blocks, block_size)
        # never-used blocks must hold zeros, not whatever the memory held (masked positions are multiplied
        # by 0 in attention, and 0 x NaN is NaN); block 0 also pads block tables. An accelerator's pool is
        # zeroed once here (its memory is taken anyway); a CPU pool's pages are committed and zeroed as blocks
        # are first used, all of a step's at once (`_zero_pending`: one op a layer, not one a block and layer)
        lazy = torch.device(device).type == "cpu"
        make = torch.empty if lazy else torch.zeros
        self.kv = {i: make(shape, dtype=dtype, device=device) for i in self.layer_ids}
        self.touched = bytearray(num_blocks) if lazy else bytearray(b"\x01") * num_blocks
        self.pending_zero: dict[int, None] = {} if not lazy else {0: None}  # first-used blocks, to zero before use
        self._zero_pending()
        self.table: dict[str, list[int]] = {}  # sequence id -> its blocks, in position order
        self.length_of: dict[str, int] = {}  # sequence id -> tokens cached
        self.hashes: dict[str, list[bytes]] = {}  # sequence id -> hash chain of its registered leading blocks
        self.recent: dict[str, list[int] | None] = {}  # token ids after those blocks (None: unknown, no more registering)
        self.provisional: set[str] = set()  # sequences holding only a pinned prefix, before their first step
        self.prefix = {"queried_tokens": 0, "hit_tokens": 0}
        self.scratch: int | None = None  # `scratch_block`, once taken

    # ---------- sizes ----------

    @property
    def num_tokens(self) -> int:
        return self.blocks.num_blocks * self.bs

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())

    def tokens_held(self) -> int:
        return sum(self.length_of.values())

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self.table

    def __len__(self) -> int:
        return len(self.table)

    def stats(self) -> dict[str, Any]:
        b = self.blocks
        return {"kv_block_size": self.bs, "kv_blocks": b.num_blocks, "kv_blocks_used": b.held,
                "kv_blocks_free": b.available, "kv_blocks_cached": len(b.lru), "kv_evictions": b.evictions,
                "prefix_queried_tokens": self.prefix["queried_tokens"], "prefix_hit_tokens": self.prefix["hit_tokens"]}

    # ---------- a step ----------

    def prepare(self, b: Batch) -> None:
        """Checks each step follows its sequence's cache, rewinds re-applied positions, takes the blocks
        the new positions need; sets b.block_table and b.token_slot."""
        tables = self.plan(b)
        _, lengths, positions = b.host_lists()
        width = max(len(t) for t in tables)
        flat = [i for t in tables for i in t + [0] * (width - len(t))]  # (B * blocks)
        bs, row = self.bs, 0
        slots = []
        for t, n in zip(tables, lengths):  # each packed token's slot, in Python (a handful of ints)
            slots += [t[p // bs] * bs + p % bs for p in positions[row:row + n]]
            row += n
        a = long_tensor(flat + slots).to(self.device)  # one tensor, sliced
        B = len(tables)
        b.block_table = a[:B * width].view(B, width)  # (B, blocks)
        b.token_slot = a[B * width:]  # (N,)

    def plan(self, b: Batch) -> list[list[int]]:
        """The bookkeeping of `prepare` (no tensors): each sequence's block table after the step, in batch
        order (the cache's own lists: read them, don't change them)."""
        try:
            starts, lengths, _ = b.host_lists()
            bs, length_of, table, immutable = self.bs, self.length_of, self.table, self.blocks.immutable
            for sid, start, n in zip(b.seq_ids, starts, lengths):
                have = length_of.get(sid)
                if have == start and n == 1 and start % bs and not immutable(table[sid][start // bs]):
                    length_of[sid] = start + 1  # the usual decode step: one token into its own last block
                    continue
                if have is None and start > 0 or have is not None and start > have:
                    raise CacheMissError(
                        f"sequence {sid!r}: step starts at position {start} but this stage caches "
                        f"{have or 0} tokens; rebuild its cache from the sequence history"
                    )
                if have is None:
                    self._new(sid)
                elif start < have:  # re-applied positions (rejected drafts, a rebuild, a pinned prefix cut short)
                    self._truncate(sid, start)
                self.provisional.discard(sid)
                self._reserve(sid, start, start + n)
                self.length_of[sid] = start + n
        finally:
            self._zero_pending()
        return [self.table[sid] for sid in b.seq_ids]

    def scratch_block(self) -> int:
        """A block no sequence ever holds, taken once: the padded rows of a static-shape step (`models.graphs`)
        write their keys and values there and read only it."""
        if self.scratch is None:
            self.scratch = self._allocate()
            self._zero_pending()
        return self.scratch

    def write(self, layer: int, b: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (N, KV, hd) for the packed tokens of this step
        self.write_packed(layer, b, torch.stack((k, v), 1))

    def write_packed(self, layer: int, b: Batch, kv: torch.Tensor) -> None:
        # kv: (N, 2, KV, hd), keys then values of the packed tokens of this step (one scatter, by slot:
        # block x block_size + offset, into the pool seen as (blocks x block_size, 2, KV, hd)). A NaN or inf
        # goes in as 0: kept in the pool it would reach other sequences, whose masked reads of block 0 and
        # of reused blocks multiply it by 0 (NaN); the sequence that made it ends at its logits
        # (`NonFiniteLogitsError`), finite values are written unchanged
        kv = torch.nan_to_num(kv, nan=0.0, posinf=0.0, neginf=0.0)
        self.kv[layer].view(-1, 2, self.n_kv, self.hd).index_copy_(0, b.token_slot, kv)

    def read(self, layer: int, b: Batch, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, KV, length, hd) keys and values of the batch's sequences, gathered through their tables."""
        B = b.block_table.shape[0]
        kv = self.kv[layer][b.block_table].view(B, -1, 2, self.n_kv, self.hd)[:, :length]  # (B, L, 2, KV, hd)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def commit(self, b: Batch, tokens: Sequence[int] | None, drafted: Sequence[int] | None = None) -> None:
        """After a step: registers the blocks it filled with tokens no later step may rewrite.

        `tokens`: the step's packed input ids (None: unknown, e.g. a rebuild; nothing more of those
        sequences is registered). `drafted[i]`: how many of sequence i's inputs were speculative drafts."""
        if not self.prefix_caching:
            return
        row = 0
        starts, lengths, _ = b.host_lists()
        for i, (sid, start, n) in enumerate(zip(b.seq_ids, starts, lengths)):
            toks, row = (None if tokens is None else list(tokens[row:row + n])), row + n
            rec, chain = self.recent.get(sid), self.hashes[sid]
            base = len(chain) * self.bs
            if rec is None or toks is None or len(rec) != start - base:
                self.recent[sid] = None
                continue
            rec = rec + toks
            confirmed = start + n - (drafted[i] if drafted else 0)
            while base + self.bs <= confirmed:
                h = block_hash(chain[-1] if chain else ROOT, rec[:self.bs])
                self.blocks.register(self.table[sid][len(chain)], h)  # an equal block elsewhere: this one stays private
                chain.append(h)
                rec, base = rec[self.bs:], base + self.bs
            self.recent[sid] = rec

    # ---------- prefixes ----------

    def pin_prefix(self, seq_id: str, hashes: Sequence[bytes]) -> int:
        """A new sequence takes the cached blocks of its longest cached prefix (`hashes`: the chain of its
        prompt's full blocks); returns the positions it holds. The first step may start anywhere up to them."""
        if not self.prefix_caching or seq_id in self.table:
            return 0
        self.prefix["queried_tokens"] += len(hashes) * self.bs
        found = []
        for h in hashes:
            block = self.blocks.lookup(h)
            if block is None:
                break
            found.append(block)
        if not found:
            return 0
        for block in found:
            self.blocks.share(block)
        self.table[seq_id], self.hashes[seq_id], self.recent[seq_id] = found, list(hashes[:len(found)]), []
        self.length_of[seq_id] = len(found) * self.bs
        self.provisional.add(seq_id)
        self.prefix["hit_tokens"] += len(found) * self.bs
        return len(found) * self.bs

    # ---------- copies, rewinds, leaving ----------

    def export(self, seq_id: str, start: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of positions start.. of one sequence, per layer: (KV, n, hd) each (a copy)."""
        pos = torch.arange(start, self.length_of[seq_id])
        blk = torch.tensor(self.table[seq_id], dtype=torch.long)[pos // self.bs]
        off = pos % self.bs
        return {i: (self.kv[i][blk, off, 0].transpose(0, 1).clone(), self.kv[i][blk, off, 1].transpose(0, 1).clone())
                for i in self.layer_ids}

    def load(self, seq_id: str, start: int, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Adds exported positions start.. of a sequence; positions already held are kept. Returns its length."""
        have = self.length_of.get(seq_id, 0)
        n = next(iter(kv.values()))[0].shape[1] if kv else 0
        if start > have:
            raise CacheMissError(f"sequence {seq_id!r}: a copy starts at position {start} but only {have} are held")
        if start + n <= have:
            return have
        if seq_id not in self.table:
            self._new(seq_id)
        self.recent[seq_id] = None  # copied positions come without their token ids
        self._reserve(seq_id, have, start + n)
        self._zero_pending()
        pos = torch.arange(have, start + n)
        blk = torch.tensor(self.table[seq_id], dtype=torch.long)[pos // self.bs]
        off, skip = pos % self.bs, have - start
        for i, (k, v) in kv.items():
            self.kv[i][blk, off, 0] = k[:, skip:].transpose(0, 1).to(self.device, self.dtype)
            self.kv[i][blk, off, 1] = v[:, skip:].transpose(0, 1).to(self.device, self.dtype)
        self.length_of[seq_id] = start + n
        return start + n

    def rewind(self, seq_id: str, length: int) -> None:
        """Forget positions length.. of a sequence (rejected draft tokens): what `prepare` does when
        a step starts before the cache's end, done now so `export` and `tokens_held` see only kept ones."""
        have = self.length_of.get(seq_id, 0)
        if not 0 <= length <= have:
            raise CacheMissError(f"sequence {seq_id!r}: cannot rewind to {length}, "
                                 f"only {have} positions are held")
        if seq_id in self.table:
            self._truncate(seq_id, length)
            self.length_of[seq_id] = length

    def free(self, seq_ids: Iterable[str]) -> None:
        """Gives back the sequences' blocks (registered ones stay cached for later prompts)."""
        for sid in seq_ids:
            for block in self.table.pop(sid, []):
                self.blocks.release(block)
            for store in (self.length_of, self.hashes, self.recent):
                store.pop(sid, None)
            self.provisional.discard(sid)

    # ---------- blocks of one sequence ----------

    def _new(self, sid: str) -> None:
        self.table[sid], self.hashes[sid], self.recent[sid], self.length_of[sid] = [], [], [], 0

    def _truncate(self, sid: str, length: int) -> None:
        """Keeps positions ..length: later blocks go back, and a registered block past it leaves the chain."""
        table, keep = self.table[sid], -(-length // self.bs)
        for block in table[keep:]:
            self.blocks.release(block)
        del table[keep:]
        chain, full = self.hashes[sid], length // self.bs
        if len(chain) > full:  # cut inside the registered chain
            del chain[full:]
            # on a block boundary nothing partial is left: registering goes on from there; inside a block,
            # that block's tokens are not kept (only its hash was): stop registering this one
            self.recent[sid] = [] if length == full * self.bs else None
        elif self.recent[sid] is not None:
            self.recent[sid] = self.recent[sid][:length - len(chain) * self.bs]
        self.length_of[sid] = min(self.length_of[sid], length)

    def _zero_pending(self) -> None:
        """Zeros the blocks first used since the last call (before the step reads or writes them)."""
        if self.pending_zero:
            idx = torch.tensor(list(self.pending_zero), dtype=torch.long, device=self.device)
            for t in self.kv.values():
                t.index_fill_(0, idx, 0)
            for block in self.pending_zero:
                self.touched[block] = 1
            self.pending_zero.clear()

    def _allocate(self, overwritten: bool = False) -> int:
        """A block for the caller; `overwritten`: its whole contents are about to be copied in (no zeroing)."""
        block = self.blocks.allocate()
        if overwritten:
            self.pending_zero.pop(block, None)
            self.touched[block] = 1
        elif not self.touched[block]:
            self.pending_zero[block] = None
        return block

    def _reserve(self, sid: str, start: int, end: int) -> None:
        """Blocks for positions ..end; a block the step writes into that others may read is copied first."""
        table = self.table[sid]
        while len(table) * self.bs < end:
            table.append(self._allocate())
        for j in range(start // self.bs, -(-end // self.bs)):
            if self.blocks.immutable(table[j]):
                fresh = self._allocate(overwritten=True)
                for t in self.kv.values():
                    t[fresh] = t[table[j]]
                self.blocks.release(table[j])
                table[j] = fresh


CPU_POOL_BYTES = 1 << 30  # a CPU stage's default pool
GPU_SHARE = 0.9  # of the stage's share of its GPU, the rest (minus weights) is the pool


def default_pool_tokens(token_bytes: int, cap_tokens: int, gpu_bytes: int = 0, gpu_fraction: float = 1.0,
                        weight_bytes: int = 0, ram_share: int = CPU_POOL_BYTES) -> int:
    """A stage's KV pool in tokens when none is given: on a CPU (`gpu_bytes` = 0) 1 GiB, or `ram_share`
    if less (the caller's share of the node's memory); on a GPU its share (`gpu_fraction` of
    `gpu_bytes`, as Ray's num_gpus) x 0.9 minus its weights, so stages sharing a GPU do not starve
    each other. Never more than `cap_tokens` (what the sequences could ever use)."""
    budget = GPU_SHARE * gpu_fraction * gpu_bytes - weight_bytes if gpu_bytes else min(CPU_POOL_BYTES, ram_share)
    tokens = int(budget // token_bytes)
    if tokens < 1:
        from models.errors import ConfigError

        raise ConfigError(f"no memory left for a KV cache: the stage's GPU share ({gpu_fraction:g} x "
                          f"{gpu_bytes / 2**30:.1f} GiB x {GPU_SHARE}) is taken by its weights "
                          f"({weight_bytes / 2**30:.1f} GiB); give stages more of a GPU or set kv_cache_tokens")
    return min(tokens, cap_tokens)
