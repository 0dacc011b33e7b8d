"""The live topology: Ray's nodes, with links measured by probe actors through the object store.

One `ProbeActor` per node (no CPU, hard node affinity). For every ordered pair of nodes (a, b),
probe a times a round trip to probe b (latency = half of the best round trip) and a pull of an
`nbytes` object that b produced, which Ray moves from b's object store to a's (bandwidth = bytes
over the pull time minus the latency). The result is a `Topology` whose nodes are Ray node ids,
so the router's planner prices hops between replicas on different nodes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from topology.graph import Topology

log = logging.getLogger(__name__)


class ProbeActor:
    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ping(self) -> float:
        return time.time()

    def blob(self, nbytes: int) -> np.ndarray:
        """A payload that stays in this node's object store (above Ray's inline limit)."""
        return np.ones(nbytes, dtype=np.uint8)

    def rtt_ms(self, other: Any, repeats: int = 5) -> float:
        """Best round trip to `other`, in ms (one warm-up call first)."""
        import ray

        ray.get(other.ping.remote())
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ray.get(other.ping.remote())
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    def pull_ms(self, other: Any, nbytes: int, repeats: int = 2) -> float:
        """Best time to fetch an `nbytes` object produced on `other`'s node, in ms."""
        import ray

        best = float("inf")
        for _ in range(repeats):
            ref = other.blob.remote(nbytes)
            ray.wait([ref], fetch_local=False)  # produced, still on the other node
            t0 = time.perf_counter()
            ray.get(ref)
            best = min(best, time.perf_counter() - t0)
        return best * 1e3


def start_probes(node_ids: list[str], name_prefix: str | None = None) -> dict[str, Any]:
    """One probe actor per node, pinned there (named `<prefix>/probe-<node id>` when a prefix is given)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.pipeline import NAMESPACE

    probes = {}
    for node in node_ids:
        opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        if name_prefix:
            opts.update(name=f"{name_prefix}/probe-{node}", namespace=NAMESPACE, lifetime="detached",
                        get_if_exists=True)
        probes[node] = ray.remote(ProbeActor).options(**opts).remote()
    return probes


def measure_topology(probes: dict[str, Any], nbytes: int = 4 << 20) -> Topology:
    """A Topology of the probed nodes with measured links (latency ms, bandwidth Gb/s)."""
    import ray

    t0 = time.perf_counter()
    gpus = {n["NodeID"]: int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")}
    links = []
    for a, pa in probes.items():
        for b, pb in probes.items():
            if a == b:
                continue
            rtt = ray.get(pa.rtt_ms.remote(pb))
            pull = ray.get(pa.pull_ms.remote(pb, nbytes))
            latency = rtt / 2
            seconds = max(pull - latency, 1e-3) / 1e3
            links.append({"a": a, "b": b, "latency_ms": round(latency, 4), "directed": True,
                          "bandwidth_gbps": round(nbytes * 8 / seconds / 1e9, 3)})
    topo = Topology.from_dict({"nodes": {n: {"gpus": gpus.get(n, 0)} for n in probes}, "links": links},
                              where="measured topology")
    log.info("measured %d links between %d nodes in %.2f s", len(links), len(probes), time.perf_counter() - t0)
    return topo
