"""Planner benchmark on a synthetic cluster (target: 10,000 replicas over 32 stages in <= 50 ms).

`meshpipe bench planner [--sizes 32,100,1000] [--repeats 5]` prints one JSON object a line.
Compared, in one run: the host-grouped DP ("dp"), greedy, networkx A* over the layered graph
("astar"), and a plain networkx Dijkstra over an explicit graph with an edge between every replica
pair of consecutive stages ("networkx_all_pairs", ~N²/S edges; its build time reported apart).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import networkx as nx
import numpy as np

from topology.graph import Topology
from topology.planner import (
    END,
    START,
    HostCosts,
    ReplicaState,
    _astar_heuristic,
    _layered_graph,
    _prepare,
    _route_from_path,
    plan,
)

log = logging.getLogger(__name__)

MESSAGE_BYTES = 16 * 1024  # a hidden-state message of one decode step (e.g. (1, 2048) fp64 / (2, 2048) fp32)
REGIONS = 3


def synthetic_cluster(num_replicas: int, num_stages: int = 32, gpus_per_host: int = 8, seed: int = 0,
                      regions: int = REGIONS) -> tuple[Topology, list[ReplicaState], str]:
    """A seeded cluster: (topology, replicas, router host).

    Hosts of `gpus_per_host` GPUs in `regions` regions; each host hangs off its region's switch by a
    0.1-0.5 ms 100 Gb/s link (intra-host 0 ms, intra-region 0.2-1 ms), the switches are joined by
    20-80 ms 10 Gb/s links. Replica i serves stage i % S on a random free GPU, with random compute
    and queue times.
    """
    rng = np.random.default_rng(seed)
    num_hosts = max(1, math.ceil(num_replicas / gpus_per_host))
    hosts = [f"r{i % regions}-h{i}" for i in range(num_hosts)]
    nodes: dict[str, Any] = {h: {"gpus": gpus_per_host} for h in hosts}
    nodes.update({f"switch{g}": {} for g in range(regions)})
    up = rng.uniform(0.1, 0.5, num_hosts)
    links = [{"a": h, "b": f"switch{i % regions}", "latency_ms": float(up[i]), "bandwidth_gbps": 100.0}
             for i, h in enumerate(hosts)]
    links += [{"a": f"switch{a}", "b": f"switch{b}", "latency_ms": float(rng.uniform(20, 80)), "bandwidth_gbps": 10.0}
              for a in range(regions) for b in range(a + 1, regions)]
    topo = Topology.from_dict({"nodes": nodes, "links": links})
    slots = rng.permutation(num_hosts * gpus_per_host)[:num_replicas]  # (N,) a GPU for each replica
    compute = rng.uniform(5.0, 15.0, num_replicas)  # (N,)
    queue = rng.exponential(5.0, num_replicas) * (rng.random(num_replicas) < 0.7)  # (N,) 30 % idle
    replicas = [ReplicaState(stage=i % num_stages, replica=i // num_stages, host=hosts[int(slots[i]) // gpus_per_host],
                             compute_ms=float(compute[i]), queue_ms=float(queue[i]))
                for i in range(num_replicas)]
    return topo, replicas, hosts[int(rng.integers(num_hosts))]


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Run `fn` `repeats` times: (the times in ms, the last result)."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return times, out


def _row(n: int, num_stages: int, num_hosts: int, method: str, times: Sequence[float], **extra: Any) -> dict:
    return {"bench": "planner", "replicas": n, "stages": num_stages, "hosts": num_hosts, "method": method,
            "ms": round(min(times), 3), "ms_median": round(statistics.median(times), 3),
            "repeats": len(times), **extra}


def bench_planner(sizes: Sequence[int] = (32, 100, 1000, 3000, 10000), num_stages: int = 32, gpus_per_host: int = 8,
                  repeats: int = 5, seed: int = 0, nx_max: int = 3000) -> Iterator[dict]:
    """Yield one JSON-able dict per (size, method): best and median ms, route cost, optimal or not.

    Methods: "host_costs" (building the HostCosts matrix from the topology, networkx all-pairs),
    "dp" (`plan` given that matrix, end to end), "greedy", "astar" (<= 3000 replicas; A* search,
    graph build in "build_ms") and "networkx_all_pairs" (<= nx_max replicas; Dijkstra search in "ms",
    graph build in "build_ms"; above nx_max extrapolated linearly in edges from the largest size run).
    The slow networkx methods run min(repeats, 2) times.
    """
    slow = min(repeats, 2)
    measured_nx: tuple[int, float, float] | None = None  # (edges, build ms, search ms) of the largest run
    for n in sizes:
        topo, replicas, router = synthetic_cluster(n, num_stages, gpus_per_host, seed)
        num_hosts = sum(1 for h in topo.graph if not h.startswith("switch"))
        times, costs = _timed(lambda: HostCosts.from_topology(topo, MESSAGE_BYTES), slow)
        yield _row(n, num_stages, num_hosts, "host_costs", times, cost_ms=None, optimal=None,
                   matrix_hosts=len(costs.hosts))

        times, best = _timed(lambda: plan(replicas, num_stages, costs, router, method="dp"), repeats)
        yield _row(n, num_stages, num_hosts, "dp", times, cost_ms=round(best.cost_ms, 3), optimal=True)

        def is_opt(c: float) -> bool:
            return math.isclose(c, best.cost_ms, rel_tol=1e-9, abs_tol=1e-9)

        times, r = _timed(lambda: plan(replicas, num_stages, costs, router, method="greedy"), repeats)
        yield _row(n, num_stages, num_hosts, "greedy", times, cost_ms=round(r.cost_ms, 3), optimal=is_opt(r.cost_ms),
                   gap=round(r.cost_ms / best.cost_ms - 1, 4))

        k = max(1, n // num_stages)
        edges = k * k * (num_stages - 1) + 2 * k  # replica pairs of consecutive stages + start/end edges
        if n <= max(nx_max, 3000):
            prob = _prepare(replicas, num_stages, costs, router, None)
            build, g = _timed(lambda: _layered_graph(prob), slow)
            if n <= 3000:
                h = _astar_heuristic(prob)
                times, path = _timed(lambda: nx.astar_path(g, START, END, heuristic=h, weight="weight"), slow)
                c = nx.path_weight(g, path, weight="weight")
                yield _row(n, num_stages, num_hosts, "astar", times, build_ms=round(min(build), 3),
                           cost_ms=round(c, 3), optimal=is_opt(c), edges=g.number_of_edges())
            if n <= nx_max:
                times, (c, path) = _timed(lambda: nx.single_source_dijkstra(g, START, END, weight="weight"), slow)
                _route_from_path(prob, path, c)  # a valid route
                measured_nx = (g.number_of_edges(), min(build), min(times))
                yield _row(n, num_stages, num_hosts, "networkx_all_pairs", times, build_ms=round(min(build), 3),
                           cost_ms=round(c, 3), optimal=is_opt(c), edges=g.number_of_edges())
            del g, prob
        if n > nx_max:
            row: dict[str, Any] = {"bench": "planner", "replicas": n, "stages": num_stages, "hosts": num_hosts,
                                   "method": "networkx_all_pairs", "edges": edges, "skipped": True,
                                   "cost_ms": None, "optimal": None}
            if measured_nx:
                e0, b0, s0 = measured_nx
                row.update(extrapolated=True, build_ms=round(b0 * edges / e0, 1), ms=round(s0 * edges / e0, 1),
                           note=f"not run above nx_max={nx_max} replicas; times extrapolated linearly in edges "
                                f"from {e0} edges")
            else:
                row.update(extrapolated=False, build_ms=None, ms=None, note=f"not run above nx_max={nx_max} replicas")
            yield row
