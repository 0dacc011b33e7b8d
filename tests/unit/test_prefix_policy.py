"""The router's pure KV policies: block admission, the prefix index, prefix-aware routes, prompt chunks,
and the stages' pinning protocol (`pin_route`) over fake handles. No Ray."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from actors.prefix import EXPECTED_STEPS, KvBudget, PrefixIndex, expected_steps, pin_route
from models.generation import plan_chunks
from tests.unit.test_router_parts import FakeHandle, make_pool


def _pools(*stages: list[int]) -> Any:
    """KvBudget's view of the replicas: stage k's replica r has pool stages[k][r] tokens."""
    return lambda: {(k, r): tokens for k, pools in enumerate(stages) for r, tokens in enumerate(pools)}


def _route(*replicas: int) -> Any:
    return SimpleNamespace(replicas=tuple(replicas))


def test_budget_reserves_a_stretch_grows_and_refuses_past_the_pool() -> None:
    b = KvBudget(_pools([4096], [4096]), block_size=16)  # 256 blocks; stretches of 256 tokens, lag 64
    on = (0, 0)
    assert b.want(100, 10_000) == b.blocks_for(100 + 256 + 64)
    assert b.want(100, 120) == b.blocks_for(120)  # never past what the request can reach
    assert b.reserve("a", 100, 10_000, on) and b.used == 27
    assert b.grow("a", 300, 10_000, _route(*on)) and b.used == 27  # 300 + lag still inside
    assert b.grow("a", 400, 10_000, _route(*on)) and b.used == b.blocks_for(400 + 256 + 64)
    assert b.reserve("b", 2000, 3000, on) and b.used == 45 + 145
    assert not b.grow("a", 1500, 10_000, _route(*on))  # the pool cannot cover a's next stretch: preempt it
    assert not b.fits_now([(1000, 2000)]) and b.fits_now([(100, 200)])
    b.release("b")
    assert b.grow("a", 1500, 10_000, _route(*on)) and not b.fits_ever(4097) and b.fits_ever(4096)
    assert b.grow("gone", 1500, 10_000, None) and b.grow("a", 9000, 10_000, None)  # nothing to grow


def test_a_small_pool_reserves_in_small_stretches() -> None:
    b = KvBudget(_pools([512]), block_size=16)
    assert (b.grow_tokens, b.lag_tokens) == (32, 32)
    assert all(b.reserve(r, 10, 250, (0,)) for r in "abc") and b.used == 15


def test_each_replica_holds_what_its_own_pool_does() -> None:
    """Two replicas of a stage hold twice the sequences (the smallest pool once stood for the deployment)."""
    b = KvBudget(_pools([1024, 1024], [2048, 2048]), block_size=16)  # 64-block pools, 128-block pools
    w = b.want(700, 1000)  # 52 blocks: one sequence a replica
    assert b.blocks == 128 and b.one_pool() == 64 and b.fits_ever(1024) and not b.fits_ever(1025)
    assert b.reserve("a", 700, 1000, (0, 0)) and b.reserve("b", 700, 1000, (1, 1))  # the smallest pool: one only
    assert not b.reserve("c", 700, 1000, (0, 1)) and not b.reserve("c", 700, 1000, (1, 0))  # stage 0 full
    assert not b.fits_now([(700, 1000)]) and b.used == 2 * w
    assert not b.grow("a", 700, 1000, _route(1, 0))  # a failover onto b's stage-0 replica: no room there
    b.release("b")
    assert b.grow("a", 700, 1000, _route(1, 0))  # moved: reserved there, given back where it was
    assert dict(b.held) == {(0, 1): w, (1, 0): w} and b.reserved["a"] == ((1, 0), w)
    assert b.reserve("c", 700, 1000, (0, 0))


def test_full_names_the_replicas_a_route_must_go_around() -> None:
    b = KvBudget(_pools([1024, 1024], [2048, 2048]), block_size=16)  # 64-block pools, 128-block pools
    assert b.full(700, 1000) == frozenset()
    assert b.reserve("a", 700, 1000, (0, 0))  # 52 blocks on each
    assert b.full(700, 1000) == {(0, 0)}  # stage 1's 128-block pools hold two
    assert b.full(10, 20) == frozenset()  # a short one still fits beside it
    assert b.reserve("b", 700, 1000, (1, 0))
    assert b.full(700, 1000) == {(0, 0), (0, 1), (1, 0)}
    b.release("a")
    assert b.full(700, 1000) == {(0, 1)}


def test_plan_chunks_lets_decodes_go_and_prompts_share_the_budget() -> None:
    assert plan_chunks([1, 3000, 1, 700, 5], 512) == [1, 512, 1, 0, 0]
    assert plan_chunks([100, 700, 1], 512) == [100, 412, 1]
    assert plan_chunks([2, 2], 1) == [1, 0]


def test_index_counts_leading_blocks_and_forgets_least_recent() -> None:
    idx = PrefixIndex(block_size=4, capacity=3)
    a = idx.hashes(list(range(13)))  # 12 tokens before the last one: three blocks
    assert len(a) == 3 and len(idx.hashes(list(range(12)))) == 2  # the last token is always computed
    idx.record([(0, 1)], a)
    assert idx.hit_tokens((0, 1), a) == 12 and idx.hit_tokens((0, 0), a) == 0
    assert idx.hit_tokens((0, 1), idx.hashes([9] + list(range(1, 13)))) == 0  # differs in block 0
    idx.record([(0, 1)], idx.hashes([7] * 9))  # two new blocks push a's oldest out
    assert idx.hit_tokens((0, 1), a) == 0
    idx.record([(0, 0), (1, 0)], a)
    idx.forget((0, 0))  # drained: a replica added later under its id holds nothing
    assert idx.hit_tokens((0, 0), a) == 0 and idx.hit_tokens((1, 0), a) == 12


def test_routes_prefer_the_replicas_that_hold_the_prompt_unless_they_are_loaded() -> None:
    pool = make_pool([2, 2])
    for rep in pool.table:
        rep.compute_ms, rep.token_ms, rep.prefill_ms = 5.0, 0.5, 0.5
    idx = PrefixIndex(block_size=16, capacity=1000)
    prompt = list(range(1, 600))
    hashes = idx.hashes(prompt)
    idx.record([(0, 1), (1, 1)], hashes)
    assert pool.plan(idx, hashes, len(prompt)).replicas == (1, 1)
    assert pool.plan(idx, idx.hashes(list(range(2, 600))), 599).replicas == pool.plan().replicas  # no hit
    for k in range(200):  # replica 1 of stage 1 is swamped: its queue outweighs the 300 ms prefill saved
        pool.table.get(1, 1).sequences.add(f"s{k}")
    assert pool.plan(idx, hashes, len(prompt)).replicas == (1, 0)


def test_a_slow_link_outweighs_a_cached_prefix_over_a_long_reply_not_a_short_one() -> None:
    pool = make_pool([1, 2])
    for rep in pool.table:
        rep.compute_ms, rep.prefill_ms = 5.0, 0.5
    idx = PrefixIndex(block_size=16, capacity=1000)
    hashes = idx.hashes(list(range(1, 600)))
    idx.record([(0, 0), (1, 0)], hashes)
    pool.table.get(1, 0).inbound_ms = 100.0  # every step pays it; the prefill saved (~290 ms) is paid once
    assert pool.plan(idx, hashes, 599, steps=1).replicas == (0, 0)
    assert pool.plan(idx, hashes, 599, steps=64).replicas == (0, 1)


def test_prompt_tokens_are_priced_from_large_steps_only() -> None:
    pool = make_pool([1])
    pool.table.observe_trace([(0, 0, 0.0, 20.0)], tokens=1)  # a decode step: its cost is mostly fixed
    assert pool.table.get(0, 0).prefill_ms is None
    pool.table.observe_trace([(0, 0, 0.0, 32.0)], tokens=64)  # a prefill
    assert pool.table.get(0, 0).prefill_ms == 0.5


def test_expected_steps_are_what_is_left_up_to_a_cap() -> None:
    seq = SimpleNamespace(params=SimpleNamespace(max_new_tokens=10), generated=[1, 2, 3])
    assert expected_steps(SimpleNamespace(seq=seq)) == 7
    seq.params.max_new_tokens, seq.generated = 100_000, []
    assert expected_steps(SimpleNamespace(seq=seq)) == EXPECTED_STEPS
    seq.params.max_new_tokens, seq.generated = 3, [1, 2, 3]
    assert expected_steps(SimpleNamespace(seq=seq)) == 1


def test_pin_route_takes_the_least_any_replica_holds() -> None:
    held = {"a": 48, "b": 32}
    handles = [FakeHandle(pin_prefix=lambda items, n=n: [n for _ in items]) for n in held.values()]
    assert asyncio.run(pin_route(handles, "r1", [b"h"] * 3)) == 32
    assert handles[0].calls == [("pin_prefix", ([("r1", [b"h"] * 3)],))]

    def broken(items: list) -> list:
        raise RuntimeError("replica died")
    assert asyncio.run(pin_route([handles[0], FakeHandle(pin_prefix=broken)], "r2", [b"h"])) == 0


def test_the_prefix_cache_forgets_the_blocks_of_computed_prompts() -> None:
    """Every request's prompt blocks are counted while it computes them: none stay once all are done."""
    from actors.prefix import PrefixCache

    pc = PrefixCache(16, 1024, metrics=None)
    for i in range(200):
        req = SimpleNamespace(rid=f"r{i}", seq=SimpleNamespace(prompt=[i % 256, i // 256] + [7] * 62, generated=[]),
                              route=None)
        pc.begin(req, pc.hashes(req))
        pc.first_token(req.rid)
        pc.ended(req)
    assert not pc.computing and not pc._computing
