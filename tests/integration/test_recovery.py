"""A stage actor killed mid-generation restarts; the router rebuilds its caches; tokens stay identical.

The first slice of the fault-tolerance issue: one replica per stage, waiting for Ray's restart.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from actors import Pipeline, StageFailedError
from models import load_model
from tests.support import tokens, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS = [[5, 17, 42, 99, 3], [11, 12], list(range(30, 51)), [200], [9] * 13]
NEW = 20


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> list:
    return tokens(load_model(tiny_ckpt, dtype="float64").generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True))


def _generate_while(pipe: Pipeline, action) -> list:  # noqa: ANN001
    result: dict = {}

    def run() -> None:
        try:
            result["outs"] = pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
        except Exception as e:  # noqa: BLE001 - handed to the test below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    action()
    t.join(timeout=120)
    if "error" in result:
        raise result["error"]
    return result["outs"]


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_a_killed_stage_restarts_and_the_generation_is_identical(tiny_ckpt: Path, reference: list,
                                                                 victim: int) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=3, dtype="float64", name=f"restart-{victim}",
                           micro_batches=1, max_restarts=2)
    try:
        pipe.set_hop_delay(0, 0.05)  # 20 steps take > 1 s: the kill lands mid-generation
        handle = ray.get_actor(f"meshpipe/restart-{victim}/stage-{victim}/replica-0", namespace="meshpipe")

        def kill() -> None:
            time.sleep(0.5)
            ray.kill(handle, no_restart=False)

        outs = _generate_while(pipe, kill)
        assert tokens(outs) == reference
        recoveries = pipe.stats()["router"]["recoveries_s"]
        assert recoveries, "the kill did not hit a step"
        pipe.set_hop_delay(0, 0.0)
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)) == reference
    finally:
        pipe.shutdown()


def test_a_stage_without_restarts_fails_requests_with_a_typed_error_in_bounded_time(tiny_ckpt: Path) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="norestart", micro_batches=1,
                           max_restarts=0, restart_timeout_s=3)
    try:
        pipe.set_hop_delay(0, 0.05)
        handle = ray.get_actor("meshpipe/norestart/stage-1/replica-0", namespace="meshpipe")
        t0 = time.monotonic()
        with pytest.raises(StageFailedError, match="stage-1/replica-0"):
            _generate_while(pipe, lambda: (time.sleep(0.5), ray.kill(handle)))
        assert time.monotonic() - t0 < 30
    finally:
        pipe.shutdown()


def test_with_two_replicas_a_dead_one_is_routed_around_and_caches_rebuilt(tiny_ckpt: Path, reference: list) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=2, dtype="float64", name="reroute",
                           micro_batches=1, max_restarts=0)
    try:
        pipe.set_hop_delay(0, 0.05)
        killed: list[int] = []

        def kill_a_busy_replica() -> None:
            time.sleep(0.5)
            # and once a stage-1 replica holds sequences (a loaded machine may not have admitted them yet)
            wait_for(lambda: any(rep["sequences"] for rep in pipe.stats()["router"]["replicas"][1]), 30,
                     "a busy stage-1 replica")
            busy = [r for r, rep in enumerate(pipe.stats()["router"]["replicas"][1]) if rep["sequences"]]
            killed.append(busy[0])
            ray.kill(ray.get_actor(f"meshpipe/reroute/stage-1/replica-{busy[0]}", namespace="meshpipe"))

        t0 = time.monotonic()
        outs = _generate_while(pipe, kill_a_busy_replica)
        assert tokens(outs) == reference  # no request lost, none changed
        survivor = f"stage-1/replica-{1 - killed[0]}"
        assert all(o.route[1].endswith(survivor) for o in outs)  # moved to the other replica
        stats = pipe.stats()["router"]
        assert stats["recoveries_s"] and max(stats["recoveries_s"]) < 5, stats["recoveries_s"]
        assert not stats["replicas"][1][killed[0]]["alive"]
        assert time.monotonic() - t0 < 30
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)) == reference  # still serving
    finally:
        pipe.shutdown()


def test_a_stage_killed_during_prefill_restarts_and_the_generation_is_identical(tiny_ckpt: Path,
                                                                              reference: list) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=3, dtype="float64", name="prefill-kill", micro_batches=1)
    try:
        pipe.set_hop_delay(1, 1.0)  # the prefill waits 1 s on stage 1: the kill lands inside it
        handle = ray.get_actor("meshpipe/prefill-kill/stage-1/replica-0", namespace="meshpipe")
        before = pipe.stats()["router"]["tokens_generated"]

        def kill() -> None:  # once the prefill is sent (under load the router may take a while to send it)
            first = ray.get_actor("meshpipe/prefill-kill/stage-0/replica-0", namespace="meshpipe")
            wait_for(lambda: ray.get(first.stats.remote())["steps"] > 0, 30, "stage 0 to pass the prefill on")
            time.sleep(0.3)  # stage 1 holds it for 1 s
            assert pipe.stats()["router"]["tokens_generated"] == before  # still in the prefill
            ray.kill(handle, no_restart=False)

        outs = _generate_while(pipe, kill)
        assert tokens(outs) == reference
        assert pipe.stats()["router"]["recoveries_s"]
    finally:
        pipe.shutdown()


def test_two_stages_killed_at_once_restart_and_the_generation_is_identical(tiny_ckpt: Path,
                                                                          reference: list) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=3, dtype="float64", name="two-kills", micro_batches=1)
    try:
        pipe.set_hop_delay(0, 0.05)
        victims = [ray.get_actor(f"meshpipe/two-kills/stage-{k}/replica-0", namespace="meshpipe") for k in (0, 2)]

        def kill() -> None:
            time.sleep(0.5)
            for h in victims:
                ray.kill(h, no_restart=False)

        outs = _generate_while(pipe, kill)
        assert tokens(outs) == reference
        assert pipe.stats()["router"]["recoveries_s"]
        assert {s["stage"] for s in pipe.stats()["stages"] if s["restarts"]} == {0, 2}
    finally:
        pipe.shutdown()


def test_every_replica_of_a_stage_gone_fails_requests_naming_the_stage_in_bounded_time(tiny_ckpt: Path) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=2, dtype="float64", name="all-gone",
                           micro_batches=1, max_restarts=0)
    try:
        pipe.set_hop_delay(0, 0.05)
        handles = [ray.get_actor(f"meshpipe/all-gone/stage-1/replica-{r}", namespace="meshpipe") for r in (0, 1)]
        t0 = time.monotonic()

        def kill_both_once_the_rings_run() -> None:
            wait_for(lambda: sum(r["passes"] for r in pipe.stats()["router"]["rings"]) >= 4, 60, "the rings running")
            [ray.kill(h) for h in handles]

        with pytest.raises(StageFailedError, match="stage 1 .* has no replica left"):
            _generate_while(pipe, kill_both_once_the_rings_run)
        took, broken = time.monotonic() - t0, pipe.stats()["router"]["rings_broken"]
        assert took < 20, broken  # where the time went: each ring break's handover
        assert broken
        for b in broken:  # a break the watcher saw calls no dead member (such calls could only wait)
            assert b["why"] != "a replica died" or b["skipped"] >= 1, b
        # every break hands its sequences over within its calls' 10 s (the first failure may come before)
        wait_for(lambda: all(b["took_s"] is not None for b in pipe.stats()["router"]["rings_broken"]), 15,
                 "every ring break's handover")
        t0 = time.monotonic()
        with pytest.raises(StageFailedError, match="stage 1"):  # later requests too, at once: nothing hangs
            pipe.generate([1, 2, 3], max_new_tokens=3, timeout_s=60)
        assert time.monotonic() - t0 < 10
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("replicate_every", [0, 2])
def test_copies_on_a_standby_leave_only_the_tail_to_rebuild(tiny_ckpt: Path, reference: list,
                                                           replicate_every: int) -> None:
    name = f"standby-{replicate_every}"
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], dtype="float64", name=name,
                           micro_batches=1, max_restarts=0, replicate_every=replicate_every)
    try:
        pipe.set_hop_delay(0, 0.05)

        moved: list[int] = []

        def kill_the_busy_stage1_replica() -> None:
            # once every sequence holds 15+ positions (a fixed sleep was too short on a loaded machine)
            wait_for(lambda: pipe.stats()["router"]["tokens_generated"] >= 15 * len(PROMPTS), 60,
                     "15 tokens a sequence")
            reps = pipe.stats()["router"]["replicas"][1]
            busy = [r for r, rep in enumerate(reps) if rep["sequences"]]
            moved.append(reps[busy[0]]["sequences"])
            ray.kill(ray.get_actor(f"meshpipe/{name}/stage-1/replica-{busy[0]}", namespace="meshpipe"))

        outs = _generate_while(pipe, kill_the_busy_stage1_replica)
        assert tokens(outs) == reference
        stats = pipe.stats()["router"]
        if replicate_every:  # the standby had all but the last few positions
            assert stats["copied_positions"] >= 10 * len(PROMPTS)
            assert stats["rebuilt_positions"] <= 2 * replicate_every * moved[0]  # 0 when a copy had just landed
        else:  # replay: every position of every moved sequence
            assert stats["copied_positions"] == 0 and stats["rebuilt_positions"] >= 15 * moved[0]
    finally:
        pipe.shutdown()


def test_a_killed_router_restarts_and_resumes_every_accepted_request(tiny_ckpt: Path, reference: list) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="router-kill", micro_batches=1)
    try:
        done_before = pipe.submit([7, 8, 9], max_new_tokens=3, ignore_eos=True)
        early = pipe.result(done_before)  # finished before the kill: still answerable after it
        pipe.set_hop_delay(0, 0.05)  # 20 steps take > 1 s: the kill lands mid-generation
        router = ray.get_actor("meshpipe/router-kill/router-0", namespace="meshpipe")

        def kill() -> None:
            time.sleep(0.6)
            assert 0 < pipe.stats()["router"]["tokens_generated"] < len(PROMPTS) * NEW + 3
            ray.kill(router, no_restart=False)

        outs = _generate_while(pipe, kill)
        assert tokens(outs) == reference
        stats = pipe.stats()
        assert stats["router"]["incarnation"] == 1 and stats["router"]["resumed"] == len(PROMPTS)
        deadline = time.monotonic() + 10  # a ring frees finished caches with its next message, just after
        while any(s["sequences"] for s in pipe.stats()["stages"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(s["sequences"] == 0 for s in pipe.stats()["stages"])  # orphans freed, finished ones released
        assert pipe.result(done_before).token_ids == early.token_ids
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)) == reference
    finally:
        pipe.shutdown()


def test_calls_racing_a_restarted_routers_resume_find_their_requests(tiny_ckpt: Path, reference: list) -> None:
    """Five clients ask for their results, and others cancel, at once just after the router restarted: each
    waits for the journal's requests to be back (before, all but the first got "no request" and the
    cancels were lost while the stages' resets were awaited)."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="router-race", micro_batches=1)
    try:
        pipe.set_hop_delay(0, 0.05)
        rids = [pipe.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in PROMPTS]
        more = [pipe.submit(p, max_new_tokens=40, ignore_eos=True) for p in PROMPTS[:3]]
        time.sleep(0.6)
        router = ray.get_actor("meshpipe/router-race/router-0", namespace="meshpipe")
        ray.kill(router, no_restart=False)
        wait_for(lambda: _incarnation(router) == 1, 60, "the router back")
        results = [router.result.remote(rid) for rid in rids]  # what five clients do at once
        cancels = [router.cancel.remote(rid) for rid in more]
        assert [c.token_ids for c in ray.get(results, timeout=60)] == reference
        assert ray.get(cancels, timeout=30) == [True, True, True]
    finally:
        pipe.shutdown()


def test_a_restarted_router_keeps_the_replicas_added_and_drained_since_the_deploy(tiny_ckpt: Path,
                                                                                 reference: list) -> None:
    """Its constructor holds the deploy-time replicas: a restart forgot an added replica (which still held
    its GPU, and whose id `add_replica` then kept picking again: ActorAlreadyExistsError) and brought a
    drained one back into the routes."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], dtype="float64",
                           name="router-replicas", micro_batches=1)
    names = lambda st: [[r["name"] for r in s] for s in st["router"]["replicas"]]  # noqa: E731
    try:
        ray.get(pipe.router.drain_replica.remote(1, 5.0), timeout=60)
        ray.get(pipe.router.add_replica.remote(0), timeout=120)
        before = names(pipe.stats())
        assert [len(s) for s in before] == [2, 1]
        router = ray.get_actor("meshpipe/router-replicas/router-0", namespace="meshpipe")
        ray.kill(router, no_restart=False)
        wait_for(lambda: _incarnation(router) == 1, 60, "the router back")
        assert names(pipe.stats()) == before
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)) == reference
        assert pipe.stats()["router"]["recoveries_total"] == 0
        ray.get(pipe.router.add_replica.remote(1), timeout=120)  # a fresh id, not a taken one
        assert [len(s) for s in names(pipe.stats())] == [2, 2]
    finally:
        pipe.shutdown()


def _incarnation(router: object) -> int:
    """The router's incarnation (-1 while it is down); `stats` does not resume it."""
    try:
        return ray.get(router.stats.remote(), timeout=10)["incarnation"]  # type: ignore[attr-defined]
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
        return -1


def test_a_request_cancelled_while_its_stage_restarts_leaves_no_cache_behind(tiny_ckpt: Path) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="cancel-recovering",
                           data_path="calls", max_restarts=2)
    try:
        pipe.set_step_time(1, 0.05)
        rid = pipe.submit([3, 4, 5], max_new_tokens=200, ignore_eos=True)
        wait_for(lambda: pipe.stats()["router"]["tokens_generated"] >= 3, 30, "a few tokens")
        ray.kill(ray.get_actor("meshpipe/cancel-recovering/stage-1/replica-0", namespace="meshpipe"),
                 no_restart=False)
        time.sleep(0.1)  # the step fails; recovery waits for the restart with the request in its step
        assert pipe.cancel(rid)
        # the recovery's rebuild step still carries it: its free must follow, not ride along (a stage
        # frees nothing its message carries, and the step would cache it again on the restarted stage)
        held = lambda: [s.get("sequences") for s in pipe.stats()["stages"]]  # noqa: E731
        wait_for(lambda: held() == [0, 0], 20, "every stage to free the cancelled request's cache")
        assert pipe.stats()["router"]["recoveries_total"] == 1
    finally:
        pipe.shutdown()
