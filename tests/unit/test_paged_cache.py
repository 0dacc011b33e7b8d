"""The paged KV cache: blocks, reference counts, prefix hits, eviction, fixed memory. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import Batch, load_model
from models.blocks import BlockAllocator, chain_hashes
from models.cache import KVCache
from models.errors import CacheFullError


def test_allocator_shares_caches_and_evicts_least_recently_used() -> None:
    a = BlockAllocator(3, 4)
    x, y, z = a.allocate(), a.allocate(), a.allocate()
    assert a.available == 0
    with pytest.raises(CacheFullError, match="kv_cache_tokens"):
        a.allocate()
    assert a.register(x, b"hx") and a.register(y, b"hy")
    assert not a.register(z, b"hx")  # equal contents elsewhere: z stays private
    a.release(x)
    a.release(y)
    a.release(z)
    assert a.available == 3 and list(a.lru) == [x, y]  # cached, least recent first; z is plainly free
    a.share(a.lookup(b"hx"))  # a prefix hit takes x out of the LRU
    assert a.immutable(x) and a.available == 2
    assert a.allocate() == z  # free blocks go before cached ones
    assert a.allocate() == y and a.lookup(b"hy") is None and a.evictions == 1
    a.release(x)
    assert a.lookup(b"hx") == x  # still cached at count 0


def test_hash_chains_cover_the_prefix_not_just_the_block() -> None:
    same_block = chain_hashes([1, 2, 3, 4, 9, 9, 9, 9], 4)[1], chain_hashes([5, 6, 7, 8, 9, 9, 9, 9], 4)[1]
    assert same_block[0] != same_block[1]
    assert chain_hashes(list(range(11)), 4) == chain_hashes(list(range(8)), 4)  # partial blocks have none
    assert len(chain_hashes(list(range(11)), 4)) == 2


def _step(model, cache, sid: str, start: int, tokens: list[int], drafted: int = 0) -> torch.Tensor:  # noqa: ANN001
    b = Batch.build([sid], [start], [len(tokens)])
    out = model(torch.tensor(tokens), b, cache)
    cache.commit(b, tokens, [drafted])
    return out


def test_a_prefix_hit_gives_the_logits_of_a_full_prefill(tiny_ckpt: Path) -> None:
    """Two prompts sharing 40 tokens: the second computes only its own tail on the first's blocks,
    its logits equal a fresh full prefill's (float64), and the shared blocks are counted once."""
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache(512, block_size=8, prefix_caching=True)
    shared = [(7 * i) % 250 + 3 for i in range(40)]
    a, b = shared + [11, 12, 13], shared + [99, 98]
    _step(model, cache, "a", 0, a)
    used_by_a = cache.blocks.held
    hit = cache.pin_prefix("b", chain_hashes(b[:-1], 8))
    assert hit == 40 and cache.blocks.held == used_by_a  # shared, not copied
    ours = _step(model, cache, "b", hit, b[hit:])[0]
    ref = model(torch.tensor(b), Batch.build(["r"], [0], [len(b)]), model.new_cache())[0]
    assert torch.allclose(ours, ref, atol=1e-10)
    assert cache.stats()["prefix_hit_tokens"] == 40
    cache.free(["a", "b"])
    assert cache.blocks.held == 0 and cache.stats()["kv_blocks_cached"] == 5  # 40 shared + a's and b's none extra


def test_a_pinned_prefix_may_be_cut_short_by_the_first_step(tiny_ckpt: Path) -> None:
    """Another stage held less of the prefix: the step starts earlier and recomputes; the shared blocks
    are not written (the other holder's logits stay those of its own tokens)."""
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache(512, block_size=8, prefix_caching=True)
    p = list(range(3, 35))
    _step(model, cache, "a", 0, p)
    assert cache.pin_prefix("b", chain_hashes(p[:-1], 8)) == 24
    ours = _step(model, cache, "b", 8, p[8:])[0]
    ref = model(torch.tensor(p), Batch.build(["r"], [0], [len(p)]), model.new_cache())[0]
    assert torch.allclose(ours, ref, atol=1e-10)
    nxt = _step(model, cache, "a", len(p), [5])[0]
    ref_a = model(torch.tensor(p + [5]), Batch.build(["r"], [0], [len(p) + 1]), model.new_cache())[0]
    assert torch.allclose(nxt, ref_a, atol=1e-10)


def test_a_pin_cut_on_a_block_boundary_goes_on_registering_the_later_blocks(tiny_ckpt: Path) -> None:
    """This stage pinned 12 positions, the route only 8 (another stage held less): the first step starts
    on a block boundary, so the sequence's later blocks are still filed for later prompts."""
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache(256, block_size=4, prefix_caching=True)
    a = list(range(10, 23))  # 3 full blocks
    _step(model, cache, "a", 0, a)
    cache.free(["a"])
    b = a[:12] + list(range(50, 62))  # a's 3 blocks, then 3 of its own
    assert cache.pin_prefix("b", chain_hashes(b[:-1], 4)) == 12
    _step(model, cache, "b", 8, b[8:])
    assert cache.hashes["b"] == chain_hashes(b, 4)
    cache.free(["b"])
    assert cache.pin_prefix("c", chain_hashes(b + [1], 4)) == 24


def test_rejected_drafts_are_never_registered(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache(256, block_size=4, prefix_caching=True)
    _step(model, cache, "a", 0, [5, 6, 7, 8, 9, 10, 11], drafted=4)  # positions 3.. are drafts
    assert len(cache.hashes["a"]) == 0  # block 0 holds a draft at position 3
    _step(model, cache, "a", 3, [20, 21])  # drafts rejected: 8 (a different token) at 3, then 21
    assert len(cache.hashes["a"]) == 1
    assert cache.hashes["a"] == chain_hashes([5, 6, 7, 20], 4)
    cache.free(["a"])
    assert cache.pin_prefix("b", chain_hashes([5, 6, 7, 8, 9], 4)) == 0  # the draft's block was never filed
    assert cache.pin_prefix("c", chain_hashes([5, 6, 7, 20, 21], 4)) == 4


def test_memory_is_the_pool_whatever_the_sequences(tiny_ckpt: Path) -> None:
    """One 8,000-token sequence and 63 short ones fit a pool of 8,192 + 63 blocks; the pool's bytes never
    change, freeing gives every block back, and a sequence past the pool is refused, not allocated."""
    model = load_model(tiny_ckpt, dtype="float32")
    cache = KVCache(model.layer_ids, model.cfg.n_kv_heads, model.cfg.head_dim, torch.float32,
                    torch.device("cpu"), num_tokens=8192 + 63 * 16, block_size=16)
    size = cache.nbytes
    long_seq = Batch.build(["long"], [0], [8000])
    cache.prepare(long_seq)
    cache.prepare(Batch.build([f"s{i}" for i in range(63)], [0] * 63, [9] * 63))
    assert cache.tokens_held() == 8000 + 63 * 9 and cache.blocks.held == 500 + 63
    assert cache.nbytes == size
    with pytest.raises(CacheFullError):
        cache.prepare(Batch.build(["more"], [0], [200]))
    cache.free(["long", *[f"s{i}" for i in range(63)], "more"])
    assert cache.blocks.held == 0 and cache.blocks.available == cache.blocks.num_blocks and cache.nbytes == size


def test_export_and_load_through_block_tables(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    src, dst = (model.new_cache(256, block_size=4) for _ in range(2))
    p = list(range(3, 21))
    _step(model, src, "a", 0, p[:10])
    dst.load("a", 0, src.export("a", 0))
    _step(model, src, "a", 10, p[10:])
    dst.load("a", 10, src.export("a", 10))
    ours = _step(model, dst, "a", 18, [4])[0]
    ref = model(torch.tensor(p + [4]), Batch.build(["r"], [0], [19]), model.new_cache())[0]
    assert torch.allclose(ours, ref, atol=1e-10)


def test_never_used_blocks_are_zeroed_before_use_even_if_memory_held_nan(tiny_ckpt: Path) -> None:
    """A CPU pool's memory is whatever the OS gave: blocks are zeroed when first used (all of a step's
    at once), before the step reads them, so NaN garbage never reaches attention; a block a copy fills
    whole (copy on write of a shared prefix) is not zeroed after the copy."""
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache(512, block_size=4, prefix_caching=True)
    for t in cache.kv.values():  # garbage in every block not yet used (block 0 is zeroed at creation)
        t[1:].fill_(float("nan"))
    ref = model.new_cache(512, block_size=4, prefix_caching=False)  # no garbage, no sharing
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [5, 6, 7, 8, 30], "c": [40, 41]}
    for sid, p in prompts.items():  # b shares a's first block (prefix hit), then writes into it
        if sid == "b":
            assert cache.pin_prefix("b", chain_hashes(p, 4)) == 4
        start = 2 if sid == "b" else 0  # b re-applies positions 2.. of the shared block: copied on write
        b = Batch.build([sid], [start], [len(p) - start])
        got = model(torch.tensor(p[start:]), b, cache)
        cache.commit(b, p[start:])
        want = model(torch.tensor(p), Batch.build([sid], [0], [len(p)]), ref)
        assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-10), sid
    both = Batch.build(["a", "b", "c"], [7, 5, 2], [1, 1, 1])
    got = model(torch.tensor([1, 2, 3]), both, cache)
    assert torch.isfinite(got).all() and not cache.pending_zero
    kv = cache.export("a", 0)
    fresh = model.new_cache(512, block_size=4)
    for t in fresh.kv.values():
        t[1:].fill_(float("nan"))
    fresh.load("a", 0, kv)  # a copy of positions 0..7 into never-used blocks: the rest of its last block is zeros
    assert all(torch.isfinite(t[fresh.table["a"]]).all() for t in fresh.kv.values())


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_an_accelerator_pool_is_zeroed_once_at_creation(device: str) -> None:
    """No zeroing per block on an accelerator (each was a kernel launch per layer): the pool starts zeroed."""
    cache = KVCache([0, 1], 2, 8, torch.float32, torch.device(device), num_tokens=256, block_size=16)
    assert all(cache.touched) and not cache.pending_zero
    cache.prepare(Batch.build(["a"], [0], [40]).to(device))
    assert not cache.pending_zero
    if device != "meta":
        assert all(int(t.abs().sum()) == 0 for t in cache.kv.values())
