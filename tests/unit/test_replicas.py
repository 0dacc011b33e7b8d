"""The router's replica bookkeeping (pure, no Ray): load spreads routes, slow links are avoided."""

from __future__ import annotations

from actors.replicas import Replica, ReplicaTable
from topology.planner import HostCosts, plan


def table(counts: list[int], hosts: list[list[str]] | None = None) -> ReplicaTable:
    return ReplicaTable([
        [Replica(stage=s, replica=r, handle=None, host=(hosts[s][r] if hosts else "n0"),
                 name=f"meshpipe/t/stage-{s}/replica-{r}") for r in range(c)]
        for s, c in enumerate(counts)
    ])


def route_for(t: ReplicaTable, costs: HostCosts, source: str = "n0"):  # noqa: ANN201
    return plan(t.states(), t.num_stages, costs, source)


def test_load_spreads_new_sequences_over_replicas() -> None:
    t = table([2, 2, 2])
    costs = HostCosts.uniform(["n0"])
    used = []
    for i in range(8):
        r = route_for(t, costs)
        t.assign(r, f"s{i}")
        used.append(r.replicas)
    per_replica = [[sum(u[s] == k for u in used) for k in range(2)] for s in range(3)]
    assert per_replica == [[4, 4]] * 3  # even split, not 8 on replica 0


def test_a_slow_inbound_replica_is_avoided_and_finished_sequences_are_released() -> None:
    t = table([2, 2])
    costs = HostCosts.uniform(["n0"])
    t.observe_trace([(0, 0, 0.5, 2.0), (0, 1, 0.5, 2.0), (1, 0, 300.0, 2.0), (1, 1, 0.4, 2.0)])
    for i in range(6):
        r = route_for(t, costs)
        assert r.replicas[1] == 1  # 300 ms inbound outweighs any queue of a few sequences
        t.assign(r, f"s{i}")
    assert t.get(1, 0).sequences == set() and len(t.get(1, 1).sequences) == 6
    t.finish(r, "s5")
    assert t.take_release(r) == {(0, r.replicas[0]): ["s5"], (1, 1): ["s5"]} and t.take_release(r) == {}


def test_a_sequence_in_a_message_on_its_way_is_freed_only_after_it() -> None:
    t = table([1, 1])
    r = route_for(t, HostCosts.uniform(["n0"]))
    for sid in ("a", "b", "c"):
        t.assign(r, sid)
    t.finish(r, "a")
    with t.carrying(["b", "c"]):  # a step composed before "b" was cancelled
        t.finish(r, "b")
        assert t.take_release(r) == {(0, 0): ["a"], (1, 0): ["a"]}  # not "b": the step would cache it again
        with t.carrying(["b"]):  # a recovery's rebuild carrying it too
            pass
        assert t.take_release() == {} and [t.get(k, 0).release for k in (0, 1)] == [["b"], ["b"]]
    assert t.take_release() == {(0, 0): ["b"], (1, 0): ["b"]} and t.take_release(r) == {}
    assert not t.in_flight


def test_the_frees_of_a_message_that_failed_are_queued_again_where_they_were_taken() -> None:
    t = table([1, 1])
    r0 = route_for(t, HostCosts.uniform(["n0"]))
    t.assign(r0, "done")
    t.finish(r0, "done")
    taken = t.take_release(r0)
    t.get(1, 0).release.append("later")
    t.give_back(taken)  # the message died on its way: every replica it was for frees them later
    assert t.get(0, 0).release == ["done"] and t.get(1, 0).release == ["later", "done"]
    t.give_back(taken)
    assert t.get(1, 0).release == ["later", "done"]  # once
    t.get(0, 0).release.clear()
    t.get(0, 0).sequences.add("done")  # held there again meanwhile (a route move back): not freed
    t.give_back({(0, 0): ["done"]})
    assert t.get(0, 0).release == []


def test_hosts_matter_replicas_on_the_routers_host_win() -> None:
    t = table([2, 2], hosts=[["far", "near"], ["near", "far"]])
    costs = HostCosts.uniform(["near", "far"], ms_between=20.0)
    r = route_for(t, costs, source="near")
    assert r.hosts == ("near", "near") and r.replicas == (1, 0)


def test_unmeasured_replicas_cost_their_stages_mean() -> None:
    t = table([3])
    t.get(0, 0).observe(compute_ms=4.0)
    t.get(0, 1).observe(compute_ms=8.0)
    states = {s.replica: s for s in t.states()}
    assert states[2].compute_ms == 6.0 and states[0].compute_ms == 4.0


def test_moving_a_sequence_frees_it_only_where_it_leaves() -> None:
    t = table([1, 2])
    costs = HostCosts.uniform(["n0"])
    old = route_for(t, costs)
    t.assign(old, "s")
    t.get(1, old.replicas[1]).alive = False
    new = route_for(t, costs)
    t.move(old, new, "s")
    assert new.replicas[0] == old.replicas[0] and new.replicas[1] != old.replicas[1]
    assert t.get(0, old.replicas[0]).release == [] and "s" in t.get(0, old.replicas[0]).sequences
    assert t.get(1, old.replicas[1]).release == ["s"] and "s" in t.get(1, new.replicas[1]).sequences
