"""Blocks of a paged KV cache: who holds each, which are cached for reuse, which go first (pure Python).

A stage's KV pool is `num_blocks` fixed-size blocks (`models.cache.KVCache` owns the tensors). The
`BlockAllocator` hands blocks out and takes them back without copying anything: a block is *held*
(reference count > 0, by one sequence or, shared read-only, by several), *cached* (count 0 but
registered under the hash of its contents, reusable by a later prompt with the same prefix,
evicted least-recently-used), or *free*. Cached blocks count as free for admission.

Content addresses chain like vLLM's: a full block's hash covers its token ids and its parent
block's hash, so equal hashes mean equal prefixes, not just equal blocks (`chain_hashes`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from models.errors import CacheFullError

ROOT = b"meshpipe-kv-v1"  # the parent hash of a sequence's first block


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """16-byte BLAKE2b of the parent's hash and the block's token ids (collision-resistant: a crafted
    prompt cannot alias another user's cached blocks, as Python's `hash` of ints could)."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def chain_hashes(tokens: Sequence[int], block_size: int, parent: bytes = ROOT) -> list[bytes]:
    """The hashes of every full block of `tokens` (a partial last block has none)."""
    out = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[i:i + block_size])
        out.append(parent)
    return out


class BlockAllocator:
    """Reference counts, the content index and the LRU of cached blocks of one pool."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # never used, or evicted: pop() takes block 0 first
        self.hash_of: dict[int, bytes] = {}  # block -> content hash (registered blocks)
        self.by_hash: dict[bytes, int] = {}  # content hash -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks at count 0, least recent first
        self.evictions = 0

    @property
    def available(self) -> int:
        """Blocks a new sequence can take: free ones and cached ones (evicted on demand)."""
        return len(self._free) + len(self.lru)

    @property
    def held(self) -> int:
        return self.num_blocks - self.available

    def allocate(self) -> int:
        """A block for new contents (count 1): a free one, else the least recently used cached one."""
        if self._free:
            block = self._free.pop()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
            self.evictions += 1
        else:
            raise CacheFullError(
                f"the KV pool is full: all {self.num_blocks} blocks of {self.block_size} tokens are held by "
                "running sequences; raise kv_cache_tokens or lower max_active_sequences")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a registered block (a prefix hit): out of the LRU while held."""
        if self.refs[block] == 0:
            self.lru.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; at 0 a registered block stays cached (most recent), others are free."""
        self.refs[block] -= 1
        if self.refs[block] > 0:
            return
        if block in self.hash_of:
            self.lru[block] = None
        else:
            self._free.append(block)

    def lookup(self, h: bytes) -> int | None:
        return self.by_hash.get(h)

    def register(self, block: int, h: bytes) -> bool:
        """Files a full block under its content hash; False if another block already has it (kept)."""
        if h in self.by_hash or block in self.hash_of:
            return False
        self.by_hash[h], self.hash_of[block] = block, h
        return True

    def immutable(self, block: int) -> bool:
        """A block others may read (shared or registered): a write must copy it first."""
        return self.refs[block] > 1 or block in self.hash_of
