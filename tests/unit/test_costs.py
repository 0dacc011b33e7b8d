"""One cost model: the router's replica table, the planner and the simulator price a replica alike (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.replicas import Replica, ReplicaTable
from topology.costs import ema, node_cost, queue_ms, step_ms
from topology.graph import Topology
from topology.planner import HostCosts, ReplicaState, _prepare, plan
from topology.simulator import ModelShape, _Shortest, build_cluster

# per (stage, replica): measured step ms, ms a token (None: not measured), active sequences, inbound ms
STATES = {(0, 0): (12.0, 0.5, 3, 0.0), (0, 1): (9.0, None, 0, 4.0),
          (1, 0): (20.0, 2.0, 12, 0.0), (1, 1): (15.0, 0.1, 5, 30.0)}
KNEE = 8.0


def _table() -> ReplicaTable:
    reps = [[Replica(stage=s, replica=r, handle=object(), host=f"h{s}{r}", name=f"x/stage-{s}/replica-{r}",
                     compute_ms=c, token_ms=t, inbound_ms=b, sequences={f"seq{i}" for i in range(n)})
             for (s, r), (c, t, n, b) in STATES.items() if s == stage] for stage in (0, 1)]
    return ReplicaTable(reps, load_knee=KNEE)


def _simulator_policy() -> _Shortest:
    topo = Topology.from_dict({"nodes": {"router": {}, "h": {"gpus": 4}},
                               "links": [{"a": "router", "b": "h", "latency_ms": 0.1, "bandwidth_gbps": 100.0}]})
    cluster = build_cluster(topo, [(s, "h", 1.0) for s, _ in STATES], ["router"], 2,
                            ModelShape(layers=2), replica_ids=[r for _, r in STATES])
    cluster.inbound_ms = np.array([b for *_, b in STATES.values()])
    policy = _Shortest(cluster, seed=0, load=True, load_knee=KNEE)
    for i, (c, t, n, _) in enumerate(STATES.values()):
        policy.step_avg[i], policy.token_avg[i] = c, t
        policy._update(i)
        for _ in range(n):
            policy.admit([i])
    return policy


def _costs(states: list[ReplicaState]) -> dict[tuple[int, int], tuple[float, float, float, float]]:
    return {(s.stage, s.replica): (s.compute_ms, s.queue_ms, s.inbound_ms, s.node_cost) for s in states}


def test_router_table_planner_and_simulator_price_identical_states_identically() -> None:
    router = _costs(_table().states())
    simulator = _costs(_simulator_policy().states)
    assert router == simulator
    by_hand = {k: (step_ms(c, t, n), queue_ms(step_ms(c, t, n), n, KNEE), b) for k, (c, t, n, b) in STATES.items()}
    assert {k: v[:3] for k, v in router.items()} == pytest.approx(by_hand)
    # the planner's node costs are the same numbers
    states = _table().states()
    p = _prepare(states, 2, HostCosts.uniform({s.host for s in states}), "h00", None)
    for s, st in enumerate(p.stages):
        assert st.node.tolist() == [router[(s, int(r))][3] for r in st.ids]


def test_the_route_follows_the_shared_costs() -> None:
    states = _table().states()
    route = plan(states, 2, HostCosts.uniform({s.host for s in states}), "h00")
    cheapest = [min((r for r in states if r.stage == s), key=node_cost).replica for s in (0, 1)]
    assert list(route.replicas) == cheapest
    assert route.cost_ms == pytest.approx(sum(node_cost(r) for r in states if (r.stage, r.replica) in
                                              {(0, cheapest[0]), (1, cheapest[1])}))


def test_formulas() -> None:
    assert ema(None, 5.0) == 5.0 and ema(10.0, 0.0) == pytest.approx(7.0)
    assert step_ms(None, None, 4) == 1.0 and step_ms(None, None, 4, fallback_ms=3.0) == 3.0
    assert step_ms(10.0, 1.0, 4) == 10.0  # memory-bound: flat at its measured step
    assert step_ms(10.0, 1.0, 19) == 20.0  # compute-bound: grows with the batch
    assert queue_ms(16.0, 4, 8.0) == 8.0 and queue_ms(0.1, 8, 8.0) == 1.0  # at least MIN_STEP_MS a step
    assert node_cost(ReplicaState(0, 0, "h", compute_ms=1.0, queue_ms=2.0, inbound_ms=3.0)) == 6.0
