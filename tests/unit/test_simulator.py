"""The discrete-event simulator (topology/simulator.py): pure Python + numpy, no Ray, small clusters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from topology import Topology
from topology.simulator import (
    POLICIES,
    ModelShape,
    Request,
    SimCluster,
    bench_simulator,
    build_cluster,
    poisson_workload,
    round_robin_capacity_per_s,
    simulate,
    synthetic_cluster,
)

SUMMARY_KEYS = {"bench", "policy", "gpus", "hosts", "regions", "stages", "requests", "tokens", "sim_seconds",
                "tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "wall_s"}


@pytest.fixture(scope="module")
def small() -> SimCluster:
    """48 GPUs (6 hosts) in 2 regions, 4 stages of 12 replicas."""
    return synthetic_cluster(num_gpus=48, regions=2, num_stages=4, seed=0)


def _loaded_workload(cluster: SimCluster, seed: int = 0, requests: int = 200) -> list[Request]:
    """Arrivals at 65 % of round-robin's saturation rate."""
    rate = 0.65 * round_robin_capacity_per_s(cluster)
    return poisson_workload(requests, rate, len(cluster.routers), seed=seed)


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_s"}


def test_same_seed_same_results_different_seed_different(small: SimCluster) -> None:
    work = _loaded_workload(small)
    for policy in ("shortest", "random"):
        a, b = simulate(small, work, policy, seed=0), simulate(small, work, policy, seed=0)
        assert np.array_equal(a.latency_ms, b.latency_ms) and np.array_equal(a.ttft_ms, b.ttft_ms)
        assert a.routes == b.routes and _comparable(a.summary(small)) == _comparable(b.summary(small))
    again = synthetic_cluster(num_gpus=48, regions=2, num_stages=4, seed=0)
    assert np.array_equal(again.latency_ms, small.latency_ms) and np.array_equal(again.host, small.host)
    assert poisson_workload(50, 10.0, 2, seed=0) == poisson_workload(50, 10.0, 2, seed=0)

    other = synthetic_cluster(num_gpus=48, regions=2, num_stages=4, seed=1)
    assert not np.array_equal(other.speed, small.speed) or not np.array_equal(other.stage, small.stage)
    assert poisson_workload(50, 10.0, 2, seed=1) != poisson_workload(50, 10.0, 2, seed=0)
    r0 = simulate(small, work, "random", seed=0)
    r1 = simulate(small, work, "random", seed=1)  # same cluster and workload, other random routes
    assert r0.routes != r1.routes and not np.array_equal(r0.latency_ms, r1.latency_ms)
    b1 = next(bench_simulator(48, 2, 4, requests=100, seed=1, policies=("shortest",)))
    b0 = next(bench_simulator(48, 2, 4, requests=100, seed=0, policies=("shortest",)))
    assert _comparable(b0) != _comparable(b1)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_with_its_tokens(small: SimCluster, policy: str) -> None:
    work = _loaded_workload(small)
    res = simulate(small, work, policy)
    wanted = np.array([w.gen_tokens for w in work])
    assert np.array_equal(res.tokens, wanted)
    assert (res.latency_ms > 0).all() and np.isfinite(res.latency_ms).all()
    assert (res.ttft_ms > 0).all() and (res.ttft_ms <= res.latency_ms).all()
    assert res.end_ms == pytest.approx(max(w.arrival_s * 1000 + lat for w, lat in zip(work, res.latency_ms)))
    s = res.summary(small)
    assert SUMMARY_KEYS <= set(s) and s["tokens"] == int(wanted.sum()) and s["requests"] == len(work)
    assert s["tokens_per_s"] == pytest.approx(wanted.sum() / (res.end_ms / 1000), rel=1e-3)
    assert all(len(r) == small.num_stages for r in res.routes)
    assert all(small.stage[r[s]] == s for r in res.routes for s in range(small.num_stages))
    # every sequence-pass of every stage ran in some step: gen_tokens passes x S stages
    assert res.batched == int(wanted.sum()) * small.num_stages


def test_one_replica_per_stage_latency_is_the_sum_by_hand() -> None:
    # R (router) -1 ms, 10 Gb/s- A -2 ms, 8 Gb/s- B ; B reaches R through A.
    topo = Topology.from_dict({
        "nodes": {"R": {}, "A": {"gpus": 1}, "B": {"gpus": 1}},
        "links": [{"a": "R", "b": "A", "latency_ms": 1.0, "bandwidth_gbps": 10.0},
                  {"a": "A", "b": "B", "latency_ms": 2.0, "bandwidth_gbps": 8.0}],
    })
    model = ModelShape(name="tiny", layers=2, hidden=1000, act_bytes=2, token_bytes=4, reply_bytes=16,
                       layer_ms=3.0, alpha=0.1, max_batch=4)
    cluster = build_cluster(topo, [(0, "A", 1.5), (1, "B", 3.0)], ["R"], num_stages=2, model=model)
    assert cluster.compute_ms.tolist() == [2.0, 1.0]  # one layer each: 3 ms / speed
    ra, ab = 8e-6 / 10, 8e-6 / 8  # ms a byte on each link
    prompt, gen = 10, 3
    prefill = ((1 + 4 * prompt * ra)                  # token ids R -> A
               + 2.0 * (1 + 0.1 * (prompt - 1))       # A runs a 10-token step
               + (2 + 2000 * prompt * ab)             # activations A -> B
               + 1.0 * (1 + 0.1 * (prompt - 1))       # B runs it
               + (2 + 16 * ab) + (1 + 16 * ra))       # the sampled token B -> A -> R
    decode = (1 + 4 * ra) + 2.0 + (2 + 2000 * ab) + 1.0 + (2 + 16 * ab) + (1 + 16 * ra)
    for policy in POLICIES:
        res = simulate(cluster, [Request(arrival_s=0.5, router=0, prompt_len=prompt, gen_tokens=gen)], policy)
        assert res.ttft_ms[0] == pytest.approx(prefill, rel=1e-12)
        assert res.latency_ms[0] == pytest.approx(prefill + (gen - 1) * decode, rel=1e-12)
        assert res.end_ms == pytest.approx(500 + prefill + (gen - 1) * decode, rel=1e-12)
        assert res.busy_ms.tolist() == pytest.approx([2.0 * (1.9 + gen - 1), 1.0 * (1.9 + gen - 1)])


def test_transfer_times_follow_the_topology_routes(small: SimCluster) -> None:
    nbytes = small.model.hidden * small.model.act_bytes
    names = small.nodes
    first, last = names[int(small.host[0])], names[int(small.host[-1])]
    pairs = [(first, last), ("r0-router", last), (names[int(small.host[5])], "r1-router")]
    for a, b in pairs:
        _, cost = small.topology.route(a, b, nbytes)
        assert small.transfer_ms(names.index(a), names.index(b), nbytes) == pytest.approx(cost)
    costs = small.planner_costs()  # GPU level: two GPUs of one host pay NVLink, not 0
    same = [i for i in range(1, small.num_replicas) if small.host[i] == small.host[0]][0]
    assert costs.cost(small.gpu[0], small.gpu[same]) == pytest.approx(0.01 + nbytes * 8e-6 / 600)
    assert costs.cost(small.gpu[0], small.gpu[0]) == 0.0


def test_shortest_beats_random_and_round_robin_under_load() -> None:
    for seed in (0, 1):
        cluster = synthetic_cluster(num_gpus=48, regions=2, num_stages=4, seed=seed)
        work = _loaded_workload(cluster, seed=seed)
        got = {p: simulate(cluster, work, p, seed=seed).summary(cluster) for p in POLICIES}
        for other in ("random", "round_robin"):
            assert got["shortest"]["latency_p50_s"] < got[other]["latency_p50_s"], (seed, got)
            assert got["shortest"]["latency_p99_s"] < got[other]["latency_p99_s"], (seed, got)
            assert got["shortest"]["tokens_per_s"] > got[other]["tokens_per_s"], (seed, got)
        # the router's cost model (topology/costs.py) prices measured step averages and a queue wait of
        # step x sequences / load_knee: a loaded or just-prefilled replica may be worth a WAN detour
        assert got["shortest"]["cross_region_hops"] < 0.5 * got["random"]["cross_region_hops"], (seed, got)
        # without the load term every request of a region takes the same route, and queues on it
        assert got["shortest"]["latency_p50_s"] < got["shortest_static"]["latency_p50_s"], (seed, got)


def test_static_shortest_piles_onto_one_route_load_aware_spreads(small: SimCluster) -> None:
    work = _loaded_workload(small)
    static = simulate(small, work, "shortest_static")
    aware = simulate(small, work, "shortest")
    for region in range(len(small.routers)):
        mine = [i for i, w in enumerate(work) if w.router == region]
        assert len({tuple(static.routes[i]) for i in mine}) == 1
        assert len({tuple(aware.routes[i]) for i in mine}) > 1


def test_bad_inputs_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        synthetic_cluster(num_gpus=3, num_stages=4)
    with pytest.raises(ValueError, match="num_gpus"):
        next(bench_simulator(num_gpus=3, num_stages=4))
    with pytest.raises(ValueError, match="num_stages"):
        synthetic_cluster(num_gpus=8, num_stages=0)
    with pytest.raises(ValueError, match="regions"):
        synthetic_cluster(num_gpus=16, regions=3, gpus_per_host=8, num_stages=2)  # 2 hosts for 3 regions
    for rate in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rate_per_s"):
            poisson_workload(10, rate, 2)
    with pytest.raises(ValueError, match="rate_per_s"):
        next(bench_simulator(num_gpus=48, regions=2, num_stages=4, requests=10, rate_per_s=0))
    with pytest.raises(ValueError, match="requests"):
        poisson_workload(0, 1.0, 2)
    cluster = synthetic_cluster(num_gpus=16, regions=2, num_stages=2)
    with pytest.raises(ValueError, match="policy"):
        simulate(cluster, poisson_workload(2, 1.0, 2), "fastest")
    with pytest.raises(ValueError, match="router"):
        simulate(cluster, [Request(0.0, router=5, prompt_len=4, gen_tokens=4)], "random")


def test_bench_and_cli_print_json_lines() -> None:
    rows = list(bench_simulator(num_gpus=48, regions=2, num_stages=4, requests=60, rate_per_s=20.0,
                                policies=("shortest", "random", "round_robin")))
    assert [r["policy"] for r in rows] == ["shortest", "random", "round_robin"]
    for r in rows:
        assert SUMMARY_KEYS <= set(r) and r["bench"] == "simulator" and r["gpus"] == 48 and r["hosts"] == 6
        assert r["regions"] == 2 and r["stages"] == 4 and r["requests"] == 60 and r["rate_per_s"] == 20.0
    from typer.testing import CliRunner

    from actors.cli import app

    run = CliRunner().invoke(app, ["bench", "simulate", "--gpus", "48", "--regions", "2", "--stages", "4",
                                   "--requests", "40", "--policies", "round_robin"])
    lines = run.stdout.strip().splitlines()
    assert run.exit_code == 0 and len(lines) == 1 and json.loads(lines[0])["policy"] == "round_robin"


def test_build_cluster_rejects_unknown_hosts_bad_speeds_and_short_replica_ids() -> None:
    # an unknown host was a bare KeyError; a NaN speed built a cluster whose every step time was NaN;
    # too few replica_ids silently gave the replicas arrays of different lengths
    topo = Topology.from_dict({"nodes": {"R": {}, "A": {"gpus": 2}}, "links": [{"a": "R", "b": "A"}]})
    with pytest.raises(ValueError, match=r"unknown hosts \['Z'\]"):
        build_cluster(topo, [(0, "Z", 1.0)], ["R"], 1)
    for bad in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match="speeds must be finite"):
            build_cluster(topo, [(0, "A", bad)], ["R"], 1)
    with pytest.raises(ValueError, match="replica_ids: 1 ids for 2 placements"):
        build_cluster(topo, [(0, "A", 1.0), (0, "A", 1.0)], ["R"], 1, replica_ids=[0])
