"""Several replicas per stage on the session's Ray: routes spread, slow replicas avoided, same tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from actors import DeploymentError, Pipeline
from models import ConfigError, load_model
from topology import TopologyError
from tests.support import tokens

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS = [[5, 17, 42, 99, 3], [11, 12], list(range(30, 51)), [200], [9] * 13, [1, 2, 3], [77, 78], [4] * 6]


@pytest.fixture(scope="module")
def replicated(tiny_ckpt: Path):  # noqa: ANN201
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=2, dtype="float64", name="replicated",
                        micro_batches=1)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> list:
    return load_model(tiny_ckpt, dtype="float64").generate(PROMPTS, max_new_tokens=8, ignore_eos=True)


def _replica(stats: dict, stage: int, replica: int) -> dict:
    return stats["router"]["replicas"][stage][replica]


def test_sequences_spread_over_replicas_and_keep_their_route(replicated: Pipeline, reference: list) -> None:
    info = replicated.describe()
    assert info["replicas"] == [[f"meshpipe/replicated/stage-{s}/replica-{r}" for r in range(2)] for s in range(2)]
    outs = replicated.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert tokens(outs) == tokens(reference)  # a route change mid-sequence would miss its KV cache
    used = {name for o in outs for name in o.route}
    assert used == {n for names in info["replicas"] for n in names}  # load spread: every replica served
    for o in outs:
        assert [n.split("/")[2] for n in o.route] == ["stage-0", "stage-1"]
    served = [[_replica(replicated.stats(), s, r)["served"] for r in range(2)] for s in range(2)]
    assert all(abs(a - b) <= 1 for a, b in served), served  # 8 sequences: 4 and 4 on each stage


def test_new_requests_avoid_a_slow_replica(replicated: Pipeline, reference: list) -> None:
    replicated.set_hop_delay(1, 0.3, replica=0)  # every message into stage-1/replica-0 waits 300 ms
    try:
        end = time.monotonic() + 20
        while _replica(replicated.stats(), 1, 0)["inbound_ms"] < 100:  # the router's probes notice
            assert time.monotonic() < end, replicated.stats()
            time.sleep(0.2)
        before = _replica(replicated.stats(), 1, 0)["served"]
        outs = replicated.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
        assert tokens(outs) == tokens(reference)
        assert all(o.route[1].endswith("stage-1/replica-1") for o in outs)
        assert _replica(replicated.stats(), 1, 0)["served"] == before
        assert replicated.describe()["route"][1].endswith("stage-1/replica-1")
        mermaid = replicated.routes_mermaid()
        chosen = [ln for ln in mermaid.splitlines() if ln.strip().startswith("class ") and ln.endswith(" chosen")]
        assert mermaid.startswith("graph LR") and "==>" in mermaid and "s1r1" in chosen[0]
    finally:
        replicated.set_hop_delay(1, 0.0, replica=0)


@ray.remote
class _Hog:  # holds every GPU left
    def ok(self) -> bool:
        return True


def _named(suffix: str) -> bool:
    return any(a["name"].endswith(suffix) for a in ray.util.list_named_actors(True))


def _free_gpus() -> int:
    """The free GPU count once it holds still: a killed actor's GPUs come back a moment after `ray.kill`
    (a hog sized before that would leave one free for the pending replica to take)."""
    last, since, end = -1, time.monotonic(), time.monotonic() + 15
    while time.monotonic() < end:
        now = int(ray.available_resources().get("GPU", 0))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
        time.sleep(0.1)
    return last


@pytest.mark.parametrize("router_dies", [False, True], ids=["add-times-out", "router-restarts"])
def test_an_added_replica_no_gpu_comes_for_is_given_up_and_killed(replicated: Pipeline, reference: list,
                                                                  router_dies: bool) -> None:
    """A pending replica would keep its GPU ask, its name and the autoscaler's loop for good; one a router
    left pending when it died would hold up the restarted router's start."""
    hogged = _free_gpus()
    hog = _Hog.options(num_gpus=hogged, num_cpus=0).remote()
    ray.get(hog.ok.remote())
    try:
        if router_dies:
            ref = replicated.router.add_replica.remote(0, 600.0)
            end = time.monotonic() + 30
            while not _named("replicated/stage-0/replica-2"):
                assert time.monotonic() < end, "the add never started its replica"
                time.sleep(0.1)
            ray.kill(replicated.router, no_restart=False)
            with pytest.raises(ray.exceptions.RayError):  # the call died with the router (unavailable, restarting)
                ray.get(ref, timeout=60)
            replicated.describe()  # the restarted router answers
        else:
            with pytest.raises(DeploymentError, match="stage 0 was not ready after 2 s"):
                ray.get(replicated.router.add_replica.remote(0, 2.0), timeout=60)
        end = time.monotonic() + 20
        while _named("replicated/stage-0/replica-2"):
            assert time.monotonic() < end, "the pending replica was not killed"
            time.sleep(0.2)
    finally:
        ray.kill(hog)
        end = time.monotonic() + 15
        while ray.available_resources().get("GPU", 0) < hogged and time.monotonic() < end:
            time.sleep(0.1)  # its GPUs back before the next test sizes its own hog
    assert [len(s) for s in replicated.describe()["replicas"]] == [2, 2]
    assert tokens(replicated.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == tokens(reference)


def test_a_request_goes_around_a_replica_whose_kv_pool_is_full(tiny_ckpt: Path, reference: list) -> None:
    """The cheapest route's replica holds one sequence (a 16-token pool): the others take the dearer
    replica, which has room, rather than wait for the cheap one's blocks."""
    short = [i for i, p in enumerate(PROMPTS) if len(p) + 8 <= 16]
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=1, replicas_per_stage=2, dtype="float64", name="kv-around",
                        kv_cache_tokens=16, micro_batches=1)
    try:
        p.generate([[1]], max_new_tokens=1)  # the router's loops (its probes among them) start with a request
        p.set_hop_delay(0, 0.05, replica=0)  # stage-0/replica-0 is the dear one
        end = time.monotonic() + 20
        while _replica(p.stats(), 0, 0)["inbound_ms"] < 20:  # the router's probes notice
            assert time.monotonic() < end, p.stats()
            time.sleep(0.2)
        outs = p.generate([PROMPTS[i] for i in short], max_new_tokens=8, ignore_eos=True)
        assert tokens(outs) == [reference[i].token_ids for i in short]
        used = [o.route[0].rsplit("/", 1)[1] for o in outs]
        assert "replica-0" in used and "replica-1" in used, used
    finally:
        p.shutdown()


def test_one_count_per_stage(tiny_ckpt: Path, reference: list) -> None:
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], dtype="float64", name="uneven")
    try:
        assert [len(r) for r in p.describe()["replicas"]] == [1, 2]
        assert tokens(p.generate(PROMPTS[:4], max_new_tokens=8, ignore_eos=True)) == tokens(reference[:4])
    finally:
        p.shutdown()


def test_topology_places_stages_on_named_nodes(tiny_ckpt: Path, reference: list) -> None:
    import ray

    node = ray.get_runtime_context().get_node_id()
    with pytest.raises(DeploymentError, match="topology node 'nowhere' matches 0 Ray nodes"):
        Pipeline.deploy(str(tiny_ckpt), num_stages=2, name="bad", topology={"nodes": {"nowhere": {"gpus": 2}}})
    with pytest.raises(ConfigError, match="topology has no GPUs"):
        Pipeline.deploy(str(tiny_ckpt), name="bad", topology={"nodes": {node: {}}})
    with pytest.raises(TopologyError, match=r"links\[0\].b: unknown node .B."):
        Pipeline.deploy(str(tiny_ckpt), name="bad", topology={"nodes": {node: {"gpus": 2}},
                                                             "links": [{"a": node, "b": "B"}]})
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="placed",
                        topology={"nodes": {node: {"gpus": 4, "gpu_memory_gb": 1}}})
    try:
        assert {s["node_id"] for s in p.describe()["stages"]} == {node}
        assert tokens(p.generate(PROMPTS[:3], max_new_tokens=8, ignore_eos=True)) == tokens(reference[:3])
    finally:
        p.shutdown()


def test_bad_replica_counts_name_the_problem(tiny_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="every count must be at least 1"):
        Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=0, name="bad")
    with pytest.raises(ConfigError, match="3 counts but num_stages=2"):
        Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 1, 1], name="bad")
    with pytest.raises(ConfigError, match="2 counts but the model was split into 4 stages"):
        Pipeline.deploy(str(tiny_ckpt), layers_per_stage=1, replicas_per_stage=[1, 1], name="bad")


def test_sequences_on_one_route_share_every_step(tiny_ckpt: Path) -> None:
    """Routes' costs move with load; sequences with the same replicas must still batch together."""
    p = Pipeline.deploy(str(tiny_ckpt), num_stages=1, name="onebatch", micro_batches=1)
    try:
        before = p.stats()["stages"][0]["steps"]
        p.generate([[i + 1, i + 2] for i in range(12)], max_new_tokens=6, ignore_eos=True)
        assert p.stats()["stages"][0]["steps"] - before == 6  # one step per token for all 12, not 12 x 6
    finally:
        p.shutdown()


def test_draining_a_replica_ends_its_decode_rings_as_a_removal(tiny_ckpt: Path, reference: list) -> None:
    """The ring over the drained replica stayed listed once it left the table: its break raised KeyError in
    the router and was never recorded."""
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], dtype="float64",
                           name="drain-ring", micro_batches=1)
    try:
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == tokens(reference)
        assert sorted(r["replicas"] for r in pipe.stats()["router"]["rings"]) == [[0, 0], [0, 1]]
        drained = ray.get(pipe.router.drain_replica.remote(1, 5.0), timeout=60)
        router = pipe.stats()["router"]
        gone = int(drained.rsplit("-", 1)[1])
        assert [r["replicas"] for r in router["rings"]] == [[0, 1 - gone]]
        assert [b["cause"] for b in router["rings_broken"]] == ["replica removed"]
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)) == tokens(reference)
    finally:
        pipe.shutdown()


def test_draining_the_replica_that_holds_standby_copies_keeps_the_request(tiny_ckpt: Path) -> None:
    """With `replicate_every`, a running sequence has copies on stage 1's idle replica; draining that one
    removed it while the request still named it, and the request's end raised KeyError in the router
    (its result never came)."""
    import ray

    from tests.support import wait_for

    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], dtype="float64",
                           name="drain-standby", micro_batches=1, replicate_every=2)
    try:
        want = pipe.generate([5, 17, 42], max_new_tokens=40, ignore_eos=True)[0].token_ids
        pipe.set_hop_delay(0, 0.05)
        rid = pipe.submit([5, 17, 42], max_new_tokens=40, ignore_eos=True)
        copied = lambda self, rid: bool(self.requests[rid].copies)  # noqa: E731
        wait_for(lambda: ray.get(pipe.router.__ray_call__.remote(copied, rid)), 30, "a standby copy")
        assert ray.get(pipe.router.drain_replica.remote(1, 5.0), timeout=60)
        assert pipe.result(rid, timeout=40).token_ids == want
    finally:
        pipe.shutdown()


def test_a_drain_past_its_timeout_moves_the_sequences_with_their_tokens(tiny_ckpt: Path) -> None:
    """`drain_replica(stage, timeout_s)`: after the timeout the replica counts as down, so its sequences move
    to the other replica with their caches rebuilt (before, the watcher saw it alive again and the drain
    waited for them to finish: 8-17 s here, the autoscaler blocked meanwhile)."""
    import ray

    from tests.support import wait_for

    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=[1, 2], dtype="float64",
                           name="drain-timeout", micro_batches=1)
    try:
        prompts = [[5, 17, 42], [9, 9, 9], [3, 1, 4, 1], [2, 7]]  # 4: both replicas get some, however loaded
        want = tokens(pipe.generate(prompts, max_new_tokens=150, ignore_eos=True))
        pipe.set_hop_delay(0, 0.05)  # >= 7.5 s a request
        rids = [pipe.submit(p, max_new_tokens=150, ignore_eos=True) for p in prompts]
        wait_for(lambda: all(r["sequences"] for r in pipe.stats()["router"]["replicas"][1]), 20, "both busy")
        t0 = time.monotonic()
        assert ray.get(pipe.router.drain_replica.remote(1, 1.0), timeout=120)
        assert time.monotonic() - t0 < 5.0
        assert [pipe.result(r, timeout=60).token_ids for r in rids] == want
    finally:
        pipe.shutdown()
