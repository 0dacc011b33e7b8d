"""The router's composed parts without Ray: replica pool, recovery's watcher and failover, journal,
link prober, and the one place deploy options are declared."""

from __future__ import annotations

import asyncio
import math
import itertools
import time
from typing import Any

import pytest

from actors.config import DeployConfig, RouterOptions, WireOptions, flat_options
from actors.journal import RequestJournal
from actors.pool import ReplicaPool
from actors.probe import LinkProber
from actors.recovery import RECOVERIES_KEPT, Recovery
from actors.request import Lane, Request
from actors.specs import RouterSpec, StageSetup
from models import ConfigError, SamplingParams, SequenceState
from topology.failover import Health
from topology.planner import NoReplicaError

_ids = itertools.count()


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        async def call() -> Any:
            return self.fn(*args)
        return call()


class FakeHandle:
    """Stands in for a stage actor's handle: `h.method.remote(...)` is awaitable, calls are recorded."""

    def __init__(self, **answers: Any) -> None:
        self._actor_id = type("Id", (), {"hex": staticmethod(lambda n=next(_ids): f"actor{n}")})()
        self.calls: list[tuple[str, tuple]] = []
        self.answers = answers

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("__") and name != "__ray_ready__":
            raise AttributeError(name)

        def fn(*args: Any) -> Any:
            self.calls.append((name, args))
            answer = self.answers.get(name)
            return answer(*args) if callable(answer) else answer
        return _Method(fn)


def make_pool(counts: list[int], hosts: list[list[str]] | None = None, **opts: Any) -> ReplicaPool:
    handles = [[FakeHandle(stats={"busy_s": 0.0}) for _ in range(c)] for c in counts]
    hosts = hosts or [["n0"] * c for c in counts]
    info = [[{"replica": r, "node_id": hosts[k][r]} for r in range(c)] for k, c in enumerate(counts)]
    return ReplicaPool("d", "n0", handles, info, RouterOptions(**opts), WireOptions())


def make_request(rid: str, prompt: list[int], generated: int = 0) -> Request:
    seq = SequenceState(rid, prompt, SamplingParams(max_new_tokens=8, seed=1), frozenset({0}), 64)
    for t in range(generated):
        seq.add(5 + t, None, None)
    loop = asyncio.new_event_loop()
    req = Request(rid, seq, len(prompt) + 8, None, loop.create_future())
    loop.close()
    return req


def test_pool_plans_and_spreads_sequences_over_replicas() -> None:
    pool = make_pool([2, 2])
    first = pool.plan()
    pool.table.assign(first, "a")
    for rep in pool.table:
        rep.compute_ms = 5.0
    pool.routes.invalidate()
    second = pool.plan()
    assert first.replicas != second.replicas  # the loaded route costs its queue wait
    assert [lk.codec for lk in pool.links_for(first)] == ["none", "none"]  # one host: lossless, no codec


def test_pool_plans_around_replicas_without_free_kv() -> None:
    pool = make_pool([2, 2])
    for rep in pool.table:
        rep.compute_ms = 1.0
    pool.table.get(1, 0).compute_ms = 50.0  # the cheap route goes through stage-1/replica-1
    assert pool.plan().replicas[1] == 1
    assert pool.plan(avoid=frozenset({(1, 1)})).replicas[1] == 0  # full: the dearer replica has room
    assert pool.plan(avoid=frozenset({(0, 0), (1, 1)})).replicas == (1, 0)
    with pytest.raises(NoReplicaError):  # no replica of stage 0 has room: the request waits
        pool.plan(avoid=frozenset({(0, 0), (0, 1)}))
    assert pool.plan().replicas[1] == 1 and all(st.alive for st in pool.table.states())


def test_pool_ban_backs_off_and_down_events_are_per_replica() -> None:
    pool = make_pool([2])
    rep = pool.table.get(0, 1)
    pool.ban([rep], now=100.0)
    assert not rep.alive and rep.ban_s == 2.0 and rep.banned_until == 102.0
    pool.ban([rep], now=100.0)  # banned already: unchanged
    assert rep.ban_s == 2.0
    assert pool.plan().replicas == (0,)
    pool.down_event(rep).set()
    assert pool.down_event(rep).is_set() and not pool.down_event(pool.table.get(0, 0)).is_set()


def test_pool_replaced_updates_host_labels_and_info() -> None:
    pool = make_pool([1, 1], hosts=[["n0"], ["n1"]])
    rep = pool.table.get(1, 0)
    old_id = rep.handle._actor_id.hex()
    new = FakeHandle()
    pool.down_event(rep).set()
    pool.replaced(rep, new, {"replica": 0, "node_id": "n2"})
    assert rep.host == "n2" and rep.alive and pool.replica_info[1][0]["node_id"] == "n2"
    assert pool.label_of(new._actor_id.hex()) == "stage-1/replica-0"
    assert pool.label_of(old_id) == "a stage"
    assert not pool.down_event(rep).is_set()
    assert "n2" in pool.hosts()


def test_pool_drain_waits_for_sequences_then_removes() -> None:
    pool = make_pool([2])

    async def run() -> Any:
        rep = pool.table.get(0, 1)
        rep.sequences.add("s")
        pool.table.get(0, 0).sequences.add("t")  # as loaded: the highest replica goes
        task = asyncio.ensure_future(pool.drain(0, timeout_s=5))
        await asyncio.sleep(0.1)
        assert not task.done() and rep.draining
        rep.sequences.clear()
        return await task

    removed = asyncio.run(run())
    assert removed.replica == 1 and [r.replica for r in pool.table] == [0]
    assert pool.label_of(removed.handle._actor_id.hex()) == "a stage"  # its label went with it
    assert asyncio.run(pool.drain(0)) is None  # never the last live replica


@pytest.mark.parametrize("timeout_s", [5.0, 0.05], ids=["finishing", "evicting"])
def test_a_drain_whose_stage_has_no_other_live_replica_left_keeps_its_replica(timeout_s: float) -> None:
    """The other replica dies (for good, or for a restart) while the drain waits: removing this one would
    leave the stage empty, so it serves again, its sequences kept."""
    pool = make_pool([2])

    async def run() -> Any:
        rep, other = pool.table.get(0, 1), pool.table.get(0, 0)
        other.sequences.add("t")
        rep.sequences.add("s")
        task = asyncio.ensure_future(pool.drain(0, timeout_s=timeout_s))
        await asyncio.sleep(0.2)
        assert not task.done() and rep.draining and rep.evicting == (timeout_s < 0.2)
        pool.ban([other])
        other.gone = True
        rep.sequences.clear()  # finished (or, evicting, moved: failover would find no replica but this one)
        return await task

    assert asyncio.run(run()) is None
    rep = pool.table.get(0, 1)
    assert rep.alive and not rep.draining and not rep.evicting and not pool.seen_down(rep)
    assert [r.replica for r in pool.table] == [0, 1] and pool.plan().replicas == (1,)


def test_an_eviction_stops_when_the_other_replica_goes_down_before_the_sequences_moved() -> None:
    """Evicting sends its sequences' failover to the stage's other replicas: with none live (restarting)
    the failover would wait on the evicting one (never up again) and fail them. It serves on instead."""
    pool = make_pool([2])

    async def run() -> Any:
        rep, other = pool.table.get(0, 1), pool.table.get(0, 0)
        other.sequences.add("t")
        rep.sequences.add("s")
        task = asyncio.ensure_future(pool.drain(0, timeout_s=0.05))
        await asyncio.sleep(0.2)
        assert rep.evicting and pool.down_event(rep).is_set()
        pool.ban([other])  # Ray is restarting it; "s" has not moved
        return await asyncio.wait_for(task, 2.0)

    assert asyncio.run(run()) is None
    rep = pool.table.get(0, 1)
    assert rep.alive and not rep.evicting and not pool.down_event(rep).is_set() and rep.sequences == {"s"}


def test_a_probe_answer_does_not_readmit_a_draining_replica() -> None:
    pool = make_pool([2])
    prober = LinkProber("d", pool, lambda: None)

    async def run() -> Any:
        rep = pool.table.get(0, 1)
        rep.sequences.add("s")
        pool.table.get(0, 0).sequences.add("t")
        task = asyncio.ensure_future(pool.drain(0, timeout_s=5))
        await asyncio.sleep(0.05)
        prober.observe(rep, 1.0, now=time.monotonic())  # a round sent before the drain began answers now
        assert rep.draining and not rep.alive and pool.plan().replicas == (0,)
        rep.sequences.clear()
        return await task

    assert asyncio.run(run()).replica == 1


def test_pool_export_reports_busy_fraction() -> None:
    pool = make_pool([1])
    seen: dict[str, Any] = {}

    class M:
        tags = {"deployment": "d"}
        efficiency = type("G", (), {"set": staticmethod(lambda v, tags: seen.setdefault("eff", v))})()

        def load(self, a: int, q: int) -> None:
            seen["load"] = (a, q)

        def queues(self, q: dict) -> None:
            seen["queues"] = q

    t = time.monotonic()
    pool._busy_since = t - 1.0
    pool.table.get(0, 0).busy_ms = 500.0
    pool.export(M(), 3, 1, t)
    assert seen["load"] == (3, 1) and abs(seen["eff"] - 0.5) < 1e-9 and pool.table.get(0, 0).busy_ms == 0


def make_recovery(pool: ReplicaPool, states: dict[str, tuple[str, int]]) -> tuple[Recovery, list[int]]:
    scheduled: list[int] = []
    metrics = type("M", (), {"rerouted": lambda self, n: None, "recovered": lambda self, s: None})()
    rec = Recovery("d", pool, sender=None, metrics=metrics, restart_timeout_s=5.0, key=None,  # type: ignore[arg-type]
                   reschedule=lambda: scheduled.append(1),
                   actor_states=lambda hs: [states.get(h._actor_id.hex(), ("ALIVE", 0)) for h in hs])
    return rec, scheduled


def test_a_failed_copy_to_a_standby_starts_the_next_one_from_position_0() -> None:
    """A standby Ray restarted holds nothing: every later copy started past that (CacheMissError) for good."""
    from models import CacheMissError

    pool = make_pool([2])
    rec, _ = make_recovery(pool, {})
    req = make_request("s", [1, 2, 3], generated=2)
    req.copies[0] = (1, 4)  # by the record, the standby holds positions ..4
    starts: list[list[int]] = []

    async def failed() -> None:
        raise CacheMissError("copy starts at position 4 but only 0 are held")

    async def landed() -> None:
        return None

    def replicate(standby: Any, rids: list[str], at: list[int]) -> tuple[list[Any], list[int]]:
        starts.append(list(at))
        return [failed() if len(starts) == 1 else landed()], [5]

    rep = pool.table.get(0, 0)
    rep.handle.answers["replicate"] = replicate
    with pytest.raises(CacheMissError):
        asyncio.run(rec._copy(0, rep, [req]))
    assert asyncio.run(rec._copy(0, rep, [req])) == 5
    assert starts == [[4], [0]] and req.copies[0] == (1, 5)


def test_watcher_marks_dead_replicas_and_takes_restarted_ones_back() -> None:
    pool = make_pool([2])
    rep = pool.table.get(0, 1)
    states: dict[str, tuple[str, int]] = {rep.handle._actor_id.hex(): ("RESTARTING", 0)}
    rec, scheduled = make_recovery(pool, states)
    asyncio.run(rec.watch_once())
    assert pool.down_event(rep).is_set()
    rep.alive = False
    states[rep.handle._actor_id.hex()] = ("ALIVE", 1)
    asyncio.run(rec.watch_once())
    assert not pool.down_event(rep).is_set() and rep.alive and rep.restarts_seen == 1 and scheduled


def test_a_ring_broken_by_a_failure_counts_one_recovery_when_its_requests_step_again() -> None:
    rec, _ = make_recovery(make_pool([1]), {})
    plain, broken = make_request("p", [1, 2]), [make_request(f"b{i}", [1, 2]) for i in range(2)]
    rec.resumed([plain])
    assert not rec.recoveries and rec.recovered == 0  # a plain step is no recovery
    broken[0].broken_at, broken[1].broken_at = time.monotonic() - 2.0, time.monotonic() - 1.0
    rec.resumed(broken)
    assert len(rec.recoveries) == 1 and 2.0 <= rec.recoveries[0][1] < 3.0  # from the earliest break
    assert all(r.broken_at is None for r in broken)
    rec.resumed(broken)
    assert len(rec.recoveries) == 1  # counted once
    broken[0].broken_at = time.monotonic() - 5.0  # broke, then a step failed: recover() counts from the break
    rec.resumed(broken, t0=time.monotonic(), waited=0.5)
    assert len(rec.recoveries) == 2 and rec.recoveries[1][1] >= 5.0 and rec.recoveries[1][2] == 0.5
    assert rec.recovered == 2


def test_a_long_running_router_keeps_the_last_recoveries_and_counts_them_all() -> None:
    rec, _ = make_recovery(make_pool([1]), {})
    req = make_request("r", [1, 2])
    for i in range(RECOVERIES_KEPT + 5):
        req.broken_at = time.monotonic() - i / 1000
        rec.resumed([req])
    assert len(rec.recoveries) == RECOVERIES_KEPT and rec.recovered == RECOVERIES_KEPT + 5
    assert rec.recoveries[-1][1] >= (RECOVERIES_KEPT + 4) / 1000  # the newest kept, the oldest dropped


def test_failover_moves_only_the_dead_stage_to_its_standby() -> None:
    pool = make_pool([2, 2])
    route = pool.plan()
    dead = pool.table.get(1, route.replicas[1])
    other = 1 - route.replicas[1]
    rec, _ = make_recovery(pool, {dead.handle._actor_id.hex(): ("RESTARTING", 0)})
    reqs = [make_request(f"r{i}", [1, 2, 3]) for i in range(2)]
    for r in reqs:
        r.route = route
        pool.table.assign(route, r.rid)
        r.copies[1] = (other, 3)
    assert rec.standbys(reqs) == {1: other}
    new = asyncio.run(rec.failover(reqs, time.monotonic() + 5))
    assert new.replicas == (route.replicas[0], other)
    assert all(r.route == new and 1 not in r.copies for r in reqs)
    assert not dead.alive and "r0" in dead.release
    assert asyncio.run(rec.health(dead)) == Health.DOWN


def test_all_gone_fails_fast_naming_the_stage() -> None:
    from actors.errors import StageFailedError

    pool = make_pool([1, 1])
    route = pool.plan()
    dead = pool.table.get(1, 0)
    rec, _ = make_recovery(pool, {dead.handle._actor_id.hex(): ("DEAD", 3)})
    req = make_request("r", [1, 2])
    req.route = route
    with pytest.raises(StageFailedError, match="stage 1 of deployment 'd' has no replica left"):
        asyncio.run(rec.failover([req], time.monotonic() + 5))


def test_a_gone_replica_whose_stage_has_unreachable_others_is_not_called_the_last() -> None:
    pool = make_pool([1, 2])
    rec, _ = make_recovery(pool, {})
    pool.table.get(1, 0).gone = True
    assert "lost stage-1/replica-0 for good and no route reaches its other replicas" in rec.all_gone_message(1)
    pool.table.get(1, 1).gone = True
    assert "has no replica left (stage-1/replica-0, stage-1/replica-1 are gone" in rec.all_gone_message(1)


def test_a_failed_steps_error_names_the_stage_and_the_kind_never_rays_text() -> None:
    """Ray's error text carries the remote traceback, the process id and the node's address: clients
    (503 bodies, stream error events) get the replica's name and the exception's kind only."""
    class RayLike(Exception):
        def __init__(self) -> None:
            super().__init__('ray::StageActor.forward() (pid=28581, ip=192.0.2.2, actor_id=ab12)\n'
                             '  File "/work/main/actors/stage.py", line 232\nRuntimeError: probability tensor')
            self.cause = RuntimeError("probability tensor contains either inf, nan or element < 0")

    pool = make_pool([1])
    rec, _ = make_recovery(pool, {})
    msg = str(rec.stage_error(RayLike()))
    assert "failed: RuntimeError" in msg and "deployment 'd'" in msg
    assert not [leak for leak in ("pid=", "192.0.2.2", "actor_id", "stage.py", "probability") if leak in msg]


class DictKV:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.writes = 0

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value
        self.writes += 1

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: str, by_prefix: bool = False) -> None:
        for k in [k for k in self.data if (k.startswith(key) if by_prefix else k == key)]:
            del self.data[k]

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data if k.startswith(prefix)]


def test_journal_checkpoints_only_requests_with_new_tokens() -> None:
    kv = DictKV()
    journal = RequestJournal("d", kv)
    a, b = make_request("a", [1, 2]), make_request("b", [3])
    journal.admit(a)
    journal.admit(b)
    assert kv.writes == 2
    a.seq.add(7, None, None)
    assert journal.checkpoint([a, b]) == 1 and a.journaled == 1
    assert journal.checkpoint([a, b]) == 0
    got = {r.rid: r for r in journal.load()}
    assert got["a"].generated == [7] and got["b"].generated == [] and got["a"].prompt == [1, 2]
    journal.drop("b")
    assert [r.rid for r in journal.load()] == ["a"]
    RequestJournal("other", kv).clear()
    assert len(journal.load()) == 1
    journal.clear()
    assert journal.load() == []


def test_prober_bans_longer_while_down_and_readmits_on_answer() -> None:
    pool = make_pool([2])
    calls: list[int] = []
    prober = LinkProber("d", pool, lambda: calls.append(1))
    rep = pool.table.get(0, 1)
    prober.observe(rep, 3.0, now=0.0)
    assert rep.inbound_ms > 0 and rep.alive
    rep.alive, rep.ban_s = False, 2.0
    prober.observe(rep, TimeoutError(), now=10.0)
    assert rep.ban_s == 4.0 and rep.banned_until == 14.0
    prober.observe(rep, 1.0, now=20.0)
    assert rep.alive and calls == [1]
    prober.observe(rep, RuntimeError(), now=30.0, died=True)
    assert rep.gone and not rep.alive and calls == [1, 1]
    assert prober.names() == []


def test_deploy_options_are_declared_once_and_sorted_into_sections() -> None:
    dc = DeployConfig.of("m", codec="int8", max_queued=3, dtype="float64", load_knee=4.0, probe_interval_s=0.5,
                         route_threshold=0.2, max_restarts=1)
    assert (dc.router.max_queued, dc.router.load_knee, dc.router.probe_interval_s, dc.router.route_threshold) == \
        (3, 4.0, 0.5, 0.2)
    assert dc.wire.codec == "int8" and dc.stage.dtype == "float64" and dc.stage.max_restarts == 1
    names = flat_options()
    assert len(names) == len(set(names))  # no option declared twice
    assert {"load_knee", "route_threshold", "probe_interval_s"} <= set(names)
    with pytest.raises(ConfigError, match="unknown deploy option 'bogus'"):
        DeployConfig.of("m", bogus=1)
    with pytest.raises(ConfigError, match="max_queued"):
        DeployConfig.of("m", max_queued=-1)


def test_keys_stay_out_of_errors_and_reprs() -> None:
    key = bytes(range(200, 232))  # raw bytes, not UTF-8: accepted, and shown nowhere
    raw = DeployConfig.of("m", encryption_key=key)
    assert raw.wire.encryption_key.get_secret_value() == key and "\\xc8" not in repr(raw) + str(raw)
    with pytest.raises(ConfigError) as e:
        DeployConfig.of("m", encryption_key=key, codec=key)
    assert "\\xc8" not in str(e.value) and "200" not in str(e.value)
    setup = StageSetup("d", "s", {}, 1, DeployConfig.of("m").stage, WireOptions(), key=key)
    spec = RouterSpec("d", "s", {}, RouterOptions(), WireOptions(), key=key)
    for obj in (setup, spec):
        assert ", key=" not in repr(obj) and repr(key) not in repr(obj)
    secret = DeployConfig.of("m", encryption_key="ab" * 32)
    assert "ab" * 32 not in repr(secret)


def test_lane_and_request_defaults() -> None:
    lane = Lane(0)
    req = make_request("x", [1])
    assert lane.seqs == [] and lane.step == 0 and req.route is None and req.copies == {}


def test_a_host_missing_from_a_topology_with_untrusted_links_counts_as_untrusted() -> None:
    """A replica placed anew after a node loss runs on a host the topology does not name: with untrusted
    links in it, that hop is encrypted (fail closed); in an all-trusted topology it is not."""
    from actors.pool import ReplicaPool
    from topology.graph import Topology

    def pool(trusted: bool) -> ReplicaPool:
        topo = Topology.from_dict({"nodes": {"n0": {}, "n1": {}}, "links": [
            {"a": "n0", "b": "n1", "latency_ms": 1.0, "trusted": trusted}]})
        handles = [[FakeHandle()], [FakeHandle()]]
        info = [[{"replica": 0, "node_id": "n0"}], [{"replica": 0, "node_id": "n1"}]]
        return ReplicaPool("d", "n0", handles, info, RouterOptions(), WireOptions(), topo)

    assert pool(trusted=False)._link_info("n0", "elsewhere").trusted is False
    assert pool(trusted=True)._link_info("n0", "elsewhere").trusted is True
    assert pool(trusted=False)._link_info("n0", "n1").trusted is False


def test_a_stage_refuses_plaintext_on_a_link_that_encrypts() -> None:
    from types import SimpleNamespace

    from actors.stage import StageActor
    from actors.wire import Header, MessageError

    stage = SimpleNamespace(name="s", encrypt_always=False, counters={"rejected": 0})
    plain = Header(kind="step", step=1, msg_id=1, attempt=0, sender="r", seq_ids=[], starts=[], lengths=[])
    StageActor._expect_sealed(stage, plain, False)  # a trusted hop may be plaintext
    with pytest.raises(MessageError, match="plaintext"):
        StageActor._expect_sealed(stage, plain, True)
    stage.encrypt_always = True
    with pytest.raises(MessageError, match="plaintext"):
        StageActor._expect_sealed(stage, plain, False)
    StageActor._expect_sealed(stage, Header(**{**{f: getattr(plain, f) for f in Header.__dataclass_fields__},
                                               "encrypted": True}), True)
    assert stage.counters["rejected"] == 2


def test_lanes_default_to_one_per_piece_of_hardware_the_stages_occupy() -> None:
    from actors.replicas import default_micro_batches

    def gpu(node: str, *ids: str) -> dict[str, Any]:
        return {"device": "cuda:0", "node_id": node, "gpu_ids": list(ids)}

    assert default_micro_batches([gpu("a", "0"), gpu("a", "1"), gpu("b", "0"), gpu("b", "1")]) == 4
    assert default_micro_batches([gpu("a", "0")] * 4) == 1  # fractional GPUs: the stages take turns
    assert default_micro_batches([gpu("a", "0"), gpu("a", "0"), gpu("a", "1"), gpu("a", "1")]) == 2
    assert default_micro_batches([{"device": "cuda:0", "node_id": "a"}] * 3) == 3  # ids unknown: distinct
    cpu = [{"device": "cpu", "node_id": n, "gpu_ids": []} for n in ("a", "a", "b")]
    assert default_micro_batches(cpu) == 2 and default_micro_batches(cpu[:1]) == 1


def test_a_replica_added_under_a_drained_ones_name_starts_a_fresh_busy_baseline() -> None:
    """`add` reuses a drained replica's id and name: its busy fraction came out negative (the old one's
    baseline), and a restarting replica (not alive for a moment) still counts toward the stage's replicas."""
    from actors.replicas import Replica

    pool = make_pool([1, 2])
    old = pool.table.get(1, 1)
    old.handle.answers["stats"] = {"busy_s": 50.0}

    async def run() -> list[dict]:
        await pool.loads()
        await asyncio.sleep(0.05)
        assert await pool.drain(1) is old
        pool.table.add(Replica(stage=1, replica=1, handle=FakeHandle(stats={"busy_s": 0.01}), host="n0",
                               name=old.name))
        pool.table.get(1, 0).alive = False  # banned while Ray restarts it
        await asyncio.sleep(0.05)
        return await pool.loads()

    loads = asyncio.run(run())
    assert loads[1]["busy"] >= 0 and loads[1]["replicas"] == 2


def test_a_restarted_replicas_busy_count_starts_a_new_baseline_not_a_negative_load() -> None:
    pool = make_pool([1])
    rep = pool.table.get(0, 0)

    async def run() -> list[float]:
        rep.handle.answers["stats"] = {"busy_s": 50.0}
        await pool.loads()
        await asyncio.sleep(0.05)
        rep.handle.answers["stats"] = {"busy_s": 0.01}  # Ray restarted it: its count began again
        restarted = (await pool.loads())[0]["busy"]
        await asyncio.sleep(0.1)
        rep.handle.answers["stats"] = {"busy_s": 0.06}
        return [restarted, (await pool.loads())[0]["busy"]]

    restarted, after = asyncio.run(run())
    assert math.isnan(restarted)  # no sample: the policy leaves the stage be (it read -1000x busy: a downscale)
    assert 0.2 < after <= 1.0


def test_a_preempted_sequences_queued_frees_go_out_at_once_and_are_awaited_once() -> None:
    pool = make_pool([2, 1])

    async def run() -> None:
        route = pool.plan()
        pool.table.assign(route, "s")
        pool.table.finish(route, "s")  # preempted: its caches queued to be freed with the next message
        first = pool.free_first("s")
        assert first is not None and pool.free_first("s") is first  # one free, however often it is asked
        await first
        assert all(("free", (["s"],)) in r.handle.calls for r in pool.table.on_route(route))
        assert pool.free_first("s") is None and not any("s" in r.release for r in pool.table)

    asyncio.run(run())
