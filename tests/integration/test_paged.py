"""The paged KV cache through the pipeline: prefix hits, chunked prefill, block admission, preemption,
fixed memory. Greedy tokens are compared with the single-process model (float64, tiny checkpoints)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from actors import BackPressureError, Pipeline
from models import Transformer, generate_local, load_model
from tests.checkpoints import make_tiny_llama
from tests.support import tokens, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")

SYSTEM = [(7 * i) % 250 + 3 for i in range(40)]  # a shared "system prompt" of five 8-token blocks


@pytest.fixture(scope="module")
def local(tiny_ckpt: Path) -> Transformer:
    return load_model(tiny_ckpt, dtype="float64")


def _stages(pipe: Pipeline) -> list[dict]:
    return pipe.stats()["stages"]


def _prefix(pipe: Pipeline) -> dict:
    return pipe.stats()["router"]["prefix"]


@pytest.mark.parametrize("data_path", ["ring", "calls"])
def test_prefix_hits_across_requests_choices_and_turns_give_the_local_tokens(
        tiny_ckpt: Path, local: Transformer, data_path: str) -> None:
    """Requests sharing a system prompt, n choices of one prompt and a chat's next turn each compute only
    what is not cached (prompts over 16 tokens also arrive in chunks), with the tokens of one process."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name=f"paged-{data_path}",
                           kv_block_size=8, prefill_chunk=16, data_path=data_path)
    try:
        def same(prompts: list[list[int]], n: int) -> list[list[int]]:
            got = tokens(pipe.generate(prompts, max_new_tokens=n, ignore_eos=True))
            assert got == tokens(generate_local(local, prompts, n, ignore_eos=True))
            return got

        same([SYSTEM + [11, 12, 13, 14, 15]], 12)
        assert _prefix(pipe)["hit_tokens"] == 0
        same([SYSTEM + [21, 22]], 12)
        assert _prefix(pipe)["hit_tokens"] == 40  # five blocks

        question = [(5 * i) % 250 + 3 for i in range(50)]
        answers = same([question] * 3, 10)  # n = 3: the first computes, the others start on its blocks
        assert _prefix(pipe)["hit_tokens"] == 40 + 2 * 48

        turn2 = question + answers[0] + [30, 31, 32]  # the conversation's history, then the next message
        same([turn2], 8)
        assert _prefix(pipe)["hit_tokens"] >= 40 + 2 * 48 + 56  # history: 60 tokens, 7 full blocks
        wait_for(lambda: all(s["kv_blocks_used"] == 0 for s in _stages(pipe)), what="every block given back")
        assert all(s["kv_blocks_cached"] >= 12 and s["prefix_hit_tokens"] > 0 for s in _stages(pipe))
    finally:
        pipe.shutdown()


def test_a_stage_killed_after_a_prefix_hit_rebuilds_and_the_tokens_stay_identical(
        tiny_ckpt: Path, local: Transformer) -> None:
    """The second request starts on cached blocks (no output history before them); its stage 1 dies
    mid-generation: recovery recomputes what the restarted stage lacks from stage 0, tokens unchanged."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=3, dtype="float64", name="paged-kill", kv_block_size=8,
                           max_restarts=2)
    try:
        first, second = SYSTEM + [9, 9, 9], SYSTEM + [4, 5, 6, 7]
        pipe.generate(first, max_new_tokens=4, ignore_eos=True)
        pipe.set_hop_delay(0, 0.04)  # the kill lands mid-generation
        victim = ray.get_actor("meshpipe/paged-kill/stage-1/replica-0", namespace="meshpipe")
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(r=pipe.generate(second, max_new_tokens=30, ignore_eos=True)))
        t.start()
        wait_for(lambda: _prefix(pipe)["hit_tokens"] >= 40, what="the prefix hit")
        time.sleep(0.3)
        ray.kill(victim, no_restart=False)
        t.join(timeout=120)
        assert tokens(out["r"]) == tokens(generate_local(local, [second], 30, ignore_eos=True))
    finally:
        pipe.shutdown()


def test_sequences_that_cannot_grow_are_preempted_and_finish_with_the_local_tokens(
        tiny_ckpt: Path, local: Transformer) -> None:
    """A 512-token pool and three sequences that each reach 250 positions: they start together, one is
    preempted when the pool runs out and resumes on its cached blocks; nothing fails, tokens unchanged."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="paged-preempt", kv_cache_tokens=512)
    try:
        prompts = [[i + 3, 7, 8, 9, 10, 11, 12, 13, 14, 15] for i in range(3)]
        got = pipe.generate(prompts, max_new_tokens=240, ignore_eos=True)
        assert tokens(got) == tokens(generate_local(local, prompts, 240, ignore_eos=True))
        router = pipe.stats()["router"]
        assert router["kv"]["preemptions"] >= 1 and router["rings_broken"] == []
    finally:
        pipe.shutdown()


@pytest.mark.parametrize(("data_path", "last", "lanes"), [("ring", 135, None), ("calls", 134, 1)])
def test_a_sequence_preempted_as_another_ends_joins_its_ring_again_without_breaking_it(
        tiny_ckpt: Path, local: Transformer, data_path: str, last: int, lanes: int | None) -> None:
    """Request 0 cannot grow in the very pass (step, on the Ray-call path) request 2 finishes, so it is
    placed again at once: it waits until its earlier run's caches, tail state and pass in flight are gone
    (before, the head fed the old pass's tokens to the new run and the ring broke into recovery; on the
    call path its step reached stages still holding the old run, refused as a replay, and failed with
    every request beside it)."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name=f"paged-preempt-{data_path}",
                           kv_cache_tokens=512, prefix_caching=False, data_path=data_path, micro_batches=lanes)
    try:
        prompts = [[i + 3, 7, 8, 9, 10, 11, 12, 13, 14, 15] for i in range(3)]
        news = [200, 200, last]
        ids = [pipe.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, news)]
        got = [pipe.result(i, timeout=120) for i in ids]
        assert tokens(got) == [generate_local(local, p, n, ignore_eos=True)[0].token_ids
                               for p, n in zip(prompts, news)]
        router = pipe.stats()["router"]
        assert router["kv"]["preemptions"] >= 1 and router["rings_broken"] == []
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("data_path", ["ring", "calls"])
def test_requests_cancelled_as_soon_as_submitted_give_their_pinned_prefix_back(tiny_ckpt: Path,
                                                                                data_path: str) -> None:
    """A request cancelled before the ring's head has it still had its cached prefix pinned on the route:
    the head releases it down the ring anyway (before, those blocks and the tail's state stayed)."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name=f"paged-cancel-{data_path}",
                           kv_block_size=8, data_path=data_path)
    try:
        pipe.generate([SYSTEM + [1, 2]], max_new_tokens=4, ignore_eos=True)  # the prefix is cached
        wait_for(lambda: all(s["kv_blocks_used"] == 0 for s in _stages(pipe)), what="the warm-up's blocks back")
        for i in range(40):
            rid = pipe.submit(SYSTEM + [i + 3], max_new_tokens=50, ignore_eos=True)
            time.sleep((i % 8) * 0.001)
            pipe.cancel(rid)
        wait_for(lambda: all(s["kv_blocks_used"] == 0 and s["sequences"] == 0 for s in _stages(pipe)),
                 what="every pinned block given back")
        assert pipe.stats()["router"]["rings_broken"] == []
    finally:
        pipe.shutdown()


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("long") / "tiny-8k", max_positions=8192)


def test_a_long_batch_leaves_the_pool_as_it_was_and_admission_refuses_past_it(long_ckpt: Path) -> None:
    """One 8,000-token prompt and 63 short ones run in a 9,216-token pool (the old dense cache would have
    grown to 64 x 8,000 slots, ~0.5 GB here); afterwards every block is back and the stage's memory is
    where it was; while the long one holds the pool, more work is refused (max_queued=0), not allocated."""
    pipe = Pipeline.deploy(str(long_ckpt), num_stages=1, name="paged-mem", kv_cache_tokens=9216, max_queued=0,
                           prefill_chunk=512)
    try:
        pid = pipe.describe()["stages"][0]["pid"]
        pipe.generate([[5, 6, 7]], max_new_tokens=2)  # warm: the first steps allocate torch's workspaces
        rss_before = psutil.Process(pid).memory_info().rss
        long_prompt = [(11 * i) % 250 + 3 for i in range(8000)]
        pipe.set_step_time(0, 0.02)
        rid = pipe.submit(long_prompt, max_new_tokens=40, ignore_eos=True)
        wait_for(lambda: _stages(pipe)[0]["kv_blocks_used"] >= 500, timeout=60, what="the long prompt cached")
        with pytest.raises(BackPressureError, match="KV caches are full"):
            pipe.generate([[3] * 2000], max_new_tokens=4)
        pipe.set_step_time(0, 0.0)
        short = pipe.generate([[i + 3, 4, 5] for i in range(63)], max_new_tokens=4, ignore_eos=True)
        assert all(len(c.token_ids) == 4 for c in short) and len(pipe.result(rid).token_ids) == 40
        wait_for(lambda: _stages(pipe)[0]["kv_blocks_used"] == 0, what="every block given back")
        grown = psutil.Process(pid).memory_info().rss - rss_before
        assert grown < 100 * 2**20, f"the stage holds {grown / 2**20:.0f} MB more after the batch"
        assert len(pipe.generate([[3] * 2000], max_new_tokens=4)[0].token_ids) == 4  # room again
    finally:
        pipe.shutdown()
