"""The route planner over (stage, replica): optimal against brute force and networkx (pure code, no Ray)."""

from __future__ import annotations

import itertools
import logging
import math
import random

import numpy as np
import pytest

from topology import (
    HostCosts,
    NoReplicaError,
    NoRouteError,
    PlannerError,
    ReplicaState,
    Route,
    RouteCache,
    Topology,
    TopologyError,
    plan,
    route_cost,
    route_to_mermaid,
)
from actors.bench.planner import bench_planner, synthetic_cluster

INF = math.inf
OPTIMAL = ("dp", "brute", "dijkstra", "astar")

EXAMPLE = {
    "nodes": {"A": {"gpus": 1}, "B": {}, "C": {"gpus": 2}, "D": None},
    "links": [
        {"a": "A", "b": "B", "latency_ms": 10, "bandwidth_gbps": 25},
        {"a": "A", "b": "C", "latency_ms": 1, "bandwidth_gbps": 1},
        {"a": "C", "b": "B", "latency_ms": 1, "bandwidth_gbps": 1},
        {"a": "B", "b": "D", "latency_ms": 2, "directed": True},
    ],
}


def random_case(rng: random.Random) -> tuple[list[ReplicaState], int, HostCosts, str, str | None]:
    """A small layered graph: 1..4 stages of 1..4 replicas on 1..4 hosts, an asymmetric matrix with infs."""
    num_stages, num_hosts = rng.randint(1, 4), rng.randint(1, 4)
    hosts = [f"h{i}" for i in range(num_hosts)]
    ties = rng.random() < 0.3  # small integer costs: many equal-cost routes

    def t(hi: float) -> float:
        return float(rng.randint(0, 3)) if ties else rng.uniform(0, hi)

    ms = np.array([[0.0 if i == j else INF if rng.random() < 0.2 else t(20) for j in range(num_hosts)]
                   for i in range(num_hosts)])
    replicas = []
    for s in range(num_stages):
        for rid in rng.sample(range(10), rng.randint(1, 4)):  # ids not contiguous
            replicas.append(ReplicaState(
                stage=s, replica=rid, host=rng.choice(hosts), compute_ms=t(10),
                queue_ms=t(30) if rng.random() < 0.5 else 0.0, inbound_ms=t(5) if rng.random() < 0.3 else 0.0,
                alive=rng.random() > 0.15))
    rng.shuffle(replicas)
    return replicas, num_stages, HostCosts(hosts, ms), rng.choice(hosts), rng.choice([None, *hosts])


def tie_broken_optimum(replicas: list[ReplicaState], num_stages: int, costs: HostCosts, source: str,
                       sink: str | None) -> tuple[int, ...]:
    """Every combination, summed in route order; of the cheapest, the lowest ids from the last stage back."""
    live = [[r for r in replicas if r.stage == s and r.alive] for s in range(num_stages)]
    totals = {}
    for combo in itertools.product(*live):
        at, total = source, 0.0
        for r in combo:
            total = total + costs.cost(at, r.host) + r.node_cost
            at = r.host
        totals[tuple(r.replica for r in combo)] = total + costs.cost(at, sink or source)
    best = min(totals.values())
    return min((ids for ids, c in totals.items() if c == best), key=lambda ids: ids[::-1])


def test_dp_is_optimal_against_brute_force_dijkstra_and_astar_on_random_graphs() -> None:
    rng = random.Random(0)
    routed = unroutable = 0
    for trial in range(300):
        replicas, num_stages, costs, source, sink = random_case(rng)
        args = (replicas, num_stages, costs, source, sink)
        try:
            best = plan(*args, method="brute")
        except NoReplicaError:
            unroutable += 1
            for method in ("dp", "dijkstra", "astar", "greedy"):
                with pytest.raises(NoReplicaError, match=r"stage \d"):
                    plan(*args, method=method)
            continue
        routed += 1
        routes = {m: plan(*args, method=m) for m in OPTIMAL}
        assert routes["dp"].replicas == tie_broken_optimum(*args), trial
        for m, r in routes.items():
            assert r.cost_ms == pytest.approx(best.cost_ms), (trial, m)
            assert len(r.replicas) == len(r.hosts) == num_stages
            assert route_cost(r, replicas, costs, source, sink) == pytest.approx(r.cost_ms), (trial, m)
        shuffled = replicas[:]
        rng.shuffle(shuffled)
        assert plan(shuffled, num_stages, costs, source, sink) == routes["dp"], trial  # order-independent
        try:
            greedy = plan(*args, method="greedy")
        except NoRouteError as e:  # greedy can walk into a dead end; it says so
            assert "greedy" in str(e) and not isinstance(e, NoReplicaError)
        else:
            assert greedy.cost_ms >= best.cost_ms - 1e-9, trial
            assert route_cost(greedy, replicas, costs, source, sink) == pytest.approx(greedy.cost_ms)
    assert routed >= 150 and unroutable >= 20, (routed, unroutable)  # both branches exercised


def test_dp_matches_dijkstra_on_medium_graphs_with_many_hosts_and_ties() -> None:
    rng = random.Random(1)
    for trial in range(15):
        hosts = [f"h{i}" for i in range(rng.randint(5, 40))]
        ms = np.array([[0.0 if i == j else INF if rng.random() < 0.1 else float(rng.randint(0, 5)) for j in hosts]
                       for i in hosts])
        num_stages = rng.randint(2, 8)
        replicas = [ReplicaState(s, rid, rng.choice(hosts), compute_ms=float(rng.randint(0, 3)),
                                 queue_ms=float(rng.randint(0, 2)), alive=rng.random() > 0.1)
                    for s in range(num_stages) for rid in range(rng.randint(1, 30))]
        costs = HostCosts(hosts, ms)
        try:
            dj = plan(replicas, num_stages, costs, hosts[0], method="dijkstra")
        except NoReplicaError:
            with pytest.raises(NoReplicaError):
                plan(replicas, num_stages, costs, hosts[0])
            continue
        dp = plan(replicas, num_stages, costs, hosts[0])
        assert dp.cost_ms == pytest.approx(dj.cost_ms), trial
        assert route_cost(dp, replicas, costs, hosts[0]) == pytest.approx(dp.cost_ms)
        assert plan(replicas, num_stages, costs, hosts[0], method="astar").cost_ms == pytest.approx(dj.cost_ms)


def test_the_synthetic_cluster_routes_optimally() -> None:
    topo, replicas, router = synthetic_cluster(640, num_stages=16, gpus_per_host=8, seed=3)
    costs = HostCosts.from_topology(topo, 16384)
    dp = plan(replicas, 16, costs, router)
    assert dp.cost_ms == pytest.approx(plan(replicas, 16, costs, router, method="dijkstra").cost_ms)
    assert plan(replicas, 16, costs, router, method="greedy").cost_ms >= dp.cost_ms - 1e-9


def test_ties_go_to_the_lowest_replica_id() -> None:
    costs = HostCosts.uniform(["a", "b"], 1.0)
    replicas = [ReplicaState(s, rid, host, compute_ms=2.0) for s in range(3) for rid, host in ((7, "a"), (3, "a"),
                                                                                                 (5, "a"))]
    assert plan(replicas, 3, costs, "a").replicas == (3, 3, 3)
    replicas[1].alive = False  # stage 0, replica 3
    assert plan(replicas, 3, costs, "a").replicas == (5, 3, 3)
    costs = HostCosts.uniform(["a", "b", "c"], 1.0)  # equal-cost predecessors on different hosts
    replicas = [ReplicaState(0, 5, "a", compute_ms=1), ReplicaState(0, 2, "b", compute_ms=1),
                ReplicaState(1, 0, "c", compute_ms=1)]
    for method in ("dp", "brute"):
        assert plan(replicas, 2, costs, "c", method=method).replicas == (2, 0)


def test_load_and_slow_links_steer_the_route() -> None:
    costs = HostCosts.uniform(["a", "b"], 1.0)
    replicas = [ReplicaState(0, 0, "a", compute_ms=5, queue_ms=8), ReplicaState(0, 1, "a", compute_ms=5, queue_ms=2),
                ReplicaState(1, 0, "a", compute_ms=5, inbound_ms=30), ReplicaState(1, 1, "b", compute_ms=5)]
    route = plan(replicas, 2, costs, "a")
    assert route.replicas == (1, 1) and route.hosts == ("a", "b")  # less loaded; slow inbound avoided
    assert route.cost_ms == pytest.approx(0 + 7 + 1 + 5 + 1)  # the way back from b to the router on a
    assert plan(replicas, 2, costs, "a", sink="b").cost_ms == pytest.approx(13)
    for r in replicas:
        r.queue_ms = r.inbound_ms = 0
    assert plan(replicas, 2, costs, "a").replicas == (0, 0)  # all equal now: same host, lowest ids


def test_a_stage_with_no_live_replica_is_named() -> None:
    costs = HostCosts.uniform(["a"])
    replicas = [ReplicaState(0, 0, "a"), ReplicaState(1, 4, "a", alive=False), ReplicaState(1, 2, "a", alive=False)]
    for method in ("dp", "dijkstra", "astar", "greedy", "brute"):
        with pytest.raises(NoReplicaError, match=r"stage 1 has no live replica: replicas \[2, 4\] are dead"):
            plan(replicas, 2, costs, "a", method=method)
    with pytest.raises(NoReplicaError, match="stage 2 has no live replica: none is deployed"):
        plan(replicas[:1] + [ReplicaState(1, 0, "a")], 3, costs, "a")
    assert issubclass(NoReplicaError, NoRouteError) and issubclass(NoRouteError, TopologyError)


def test_unreachable_hosts_name_the_stage_where_the_route_breaks() -> None:
    ms = np.array([[0, 1, INF], [1, 0, INF], [INF, INF, 0]])  # c is cut off
    costs = HostCosts(["a", "b", "c"], ms)
    replicas = [ReplicaState(0, 0, "b"), ReplicaState(1, 0, "c"), ReplicaState(1, 1, "c")]
    for method in ("dp", "dijkstra", "astar", "brute", "greedy"):
        with pytest.raises(NoReplicaError, match=r"stage 1: no live replica is reachable .* \['c'\]"):
            plan(replicas, 2, costs, "a", method=method)
    with pytest.raises(NoReplicaError, match="sink host 'c' is unreachable"):
        plan(replicas[:1], 1, costs, "a", sink="c")


@pytest.mark.parametrize("field", ["compute_ms", "queue_ms", "inbound_ms"])
def test_negative_or_nan_costs_name_the_replica_and_field(field: str) -> None:
    costs = HostCosts.uniform(["a"])
    for bad in (-1.0, math.nan):
        r = ReplicaState(0, 3, "a", compute_ms=1, queue_ms=10)
        setattr(r, field, bad)
        with pytest.raises(PlannerError, match=rf"stage-0/replica-3: {field}=(-1.0|nan) must be >= 0"):
            plan([r], 1, costs, "a")


def test_bad_inputs_raise_typed_errors() -> None:
    costs = HostCosts.uniform(["a", "b"])
    ok = ReplicaState(0, 0, "a")
    with pytest.raises(TopologyError, match="stage-0/replica-1: host 'zz' is not in the topology"):
        plan([ok, ReplicaState(0, 1, "zz")], 1, costs, "a")
    plan([ok, ReplicaState(0, 1, "zz", alive=False)], 1, costs, "a")  # a dead replica's host may be gone
    with pytest.raises(TopologyError, match="source host 'q'"):
        plan([ok], 1, costs, "q")
    with pytest.raises(ValueError, match="unknown planner method 'bfs': choose one of dp, dijkstra, astar"):
        plan([ok], 1, costs, "a", method="bfs")
    with pytest.raises(PlannerError, match=r"replica 2 on 'a': stage=5 is outside 0..1"):
        plan([ok, ReplicaState(5, 2, "a")], 2, costs, "a")
    with pytest.raises(PlannerError, match="stage-0/replica-0: listed twice"):
        plan([ok, ReplicaState(0, 0, "b", alive=False)], 1, costs, "a")
    many = [ReplicaState(s, r, "a") for s in range(7) for r in range(10)]
    with pytest.raises(PlannerError, match="10000000 combinations exceed"):
        plan(many, 7, costs, "a", method="brute")
    with pytest.raises(PlannerError, match="must be >= 0"):
        HostCosts(["a", "b"], np.array([[0, -1], [1, 0]]))
    with pytest.raises(PlannerError, match="shape"):
        HostCosts(["a", "b"], np.zeros((3, 3)))


def test_host_costs_from_topology_match_topology_routes() -> None:
    topo = Topology.from_dict(EXAMPLE)
    for nbytes in (0, 1e5, 10e6):
        costs = HostCosts.from_topology(topo, nbytes)
        assert sorted(costs.hosts) == ["A", "B", "C", "D"]
        for a in costs.hosts:
            for b in costs.hosts:
                try:
                    _, want = topo.route(a, b, nbytes)
                except NoRouteError:
                    want = INF
                assert costs.cost(a, b) == pytest.approx(want), (a, b, nbytes)
    assert HostCosts.from_topology(topo, 0).cost("D", "A") == INF  # the directed link goes one way
    hosts, ms = topo.transfer_matrix(0)
    assert ms.shape == (4, 4) and np.all(np.diagonal(ms) == 0)


def test_route_cache_replans_only_on_real_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="topology.planner")
    costs = HostCosts.uniform(["a", "b"], 1.0)
    replicas = [ReplicaState(0, 0, "a", compute_ms=10), ReplicaState(0, 1, "b", compute_ms=20),
                ReplicaState(1, 0, "a", compute_ms=10)]
    cache = RouteCache(threshold=0.1)
    first = cache.get(replicas, 2, costs, "a")
    assert cache.plans == 1 and first.replicas == (0, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"route: stage-0/replica-0@a -> stage-1/replica-0@a ({first.cost_ms:.1f} ms)"]
    assert caplog.records[0].levelno == logging.INFO

    assert cache.get(replicas, 2, costs, "a") is first and cache.plans == 1  # same inputs
    replicas[0].queue_ms = 0.9  # < 1 ms absolute
    replicas[1].compute_ms = 21.5  # 7.5 %: under the threshold
    assert cache.get(replicas, 2, costs, "a") is first and cache.plans == 1

    replicas[2].queue_ms = 5  # 50 %: re-plan, same route, no new log line
    again = cache.get(replicas, 2, costs, "a")
    assert cache.plans == 2 and again.replicas == first.replicas and len(caplog.records) == 1

    replicas[0].alive = False  # membership changed: re-plan, new route logged once
    moved = cache.get(replicas, 2, costs, "a")
    assert cache.plans == 3 and moved.replicas == (1, 0)
    assert cache.get(replicas, 2, costs, "a") is moved and cache.plans == 3
    assert [r.getMessage() for r in caplog.records][1:] == [
        f"route: stage-0/replica-1@b -> stage-1/replica-0@a ({moved.cost_ms:.1f} ms)"]

    replicas[1].compute_ms = 60  # big change, the only live replica: re-plan, same route
    assert cache.get(replicas, 2, costs, "a").cost_ms == pytest.approx(moved.cost_ms + 38.5)
    assert cache.plans == 4 and len(caplog.records) == 2
    cache.get(replicas, 2, HostCosts.uniform(["a", "b"], 1.0), "a")  # equal host costs rebuilt: cached
    assert cache.plans == 4
    cache.get(replicas, 2, HostCosts.uniform(["a", "b"], 2.0), "a")  # other host costs: re-plan
    assert cache.plans == 5

    replicas[1].alive = False  # nothing left at stage 0: the error comes through, the cache forgets
    with pytest.raises(NoReplicaError, match="stage 0"):
        cache.get(replicas, 2, costs, "a")
    replicas[1].alive = True
    cache.get(replicas, 2, costs, "a")
    assert cache.plans == 6


def test_route_cache_replans_when_an_infinite_node_cost_turns_finite() -> None:
    # inf -> finite passed the relative test (inf <= 0.1 * inf): the cache kept the 52 ms route for good
    costs = HostCosts.uniform(["a", "b"], 1.0)
    replicas = [ReplicaState(0, 0, "a", compute_ms=INF), ReplicaState(0, 1, "b", compute_ms=50.0)]
    cache = RouteCache()
    assert cache.get(replicas, 1, costs, "a").replicas == (1,)
    replicas[0].compute_ms = 1.0  # the unreachable replica is back, and far cheaper
    back = cache.get(replicas, 1, costs, "a")
    assert cache.plans == 2 and back.replicas == (0,) and back.cost_ms == 1.0
    replicas[0].compute_ms = INF  # and gone again: finite -> inf re-plans too
    assert cache.get(replicas, 1, costs, "a").replicas == (1,) and cache.plans == 3
    assert cache.get(replicas, 1, costs, "a").replicas == (1,) and cache.plans == 3  # inf == inf: cached


def test_mermaid_draws_stages_the_route_thick_and_dead_replicas() -> None:
    costs = HostCosts.uniform(["a", "b"], 1.0)
    replicas = [ReplicaState(0, 0, "a", compute_ms=9), ReplicaState(0, 1, "b", compute_ms=1),
                ReplicaState(1, 0, "a", alive=False), ReplicaState(1, 2, "b")]
    route = plan(replicas, 2, costs, "a")
    text = route_to_mermaid(route, replicas, 2, source="a")
    assert text.startswith("graph LR")
    assert 'subgraph stage0["stage 0"]' in text and 'subgraph stage1["stage 1"]' in text
    assert 's0r1["replica 1<br/>b"]' in text and 's1r0["replica 0 (dead)<br/>a"]' in text
    assert "start ==> s0r1" in text and "s0r1 ==> s1r2" in text and "s1r2 ==> finish" in text
    assert text.count("==>") == 3 and "s0r0 -.-> s1r2" in text and "s1r0 -.->" not in text
    assert "classDef dead" in text and "class s1r0 dead" in text and "class s0r1,s1r2 chosen" in text
    big = [ReplicaState(s, r, "a") for s in range(2) for r in range(20)]
    assert "-.->" not in route_to_mermaid(Route((0, 0), ("a", "a"), 0.0), big, 2)  # too many edges to draw


def test_route_describe_is_one_petals_style_line() -> None:
    r = Route(replicas=(1, 0), hosts=("hostA", "hostB"), cost_ms=12.34)
    assert r.describe() == "stage-0/replica-1@hostA -> stage-1/replica-0@hostB (12.3 ms)"


def test_bench_planner_smoke() -> None:
    rows = list(bench_planner(sizes=(64,), num_stages=4, repeats=1, nx_max=64))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"host_costs", "dp", "greedy", "astar", "networkx_all_pairs"}
    assert all(r["bench"] == "planner" and r["replicas"] == 64 and r["hosts"] == 8 for r in rows)
    assert by["dp"]["optimal"] and by["astar"]["optimal"] and by["networkx_all_pairs"]["optimal"]
    assert by["networkx_all_pairs"]["edges"] == 16 * 16 * 3 + 2 * 16 and by["networkx_all_pairs"]["build_ms"] >= 0
    skipped = list(bench_planner(sizes=(64, 128), num_stages=4, repeats=1, nx_max=64))[-1]
    assert skipped["method"] == "networkx_all_pairs" and skipped["skipped"] and skipped["extrapolated"]
