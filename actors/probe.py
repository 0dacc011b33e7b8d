"""The live topology: Ray's nodes, with links measured by probe actors through the object store.

One `ProbeActor` per node (no CPU, hard node affinity). For every ordered pair of nodes (a, b),
probe a times a round trip to probe b (latency = half of the best round trip) and a pull of an
`nbytes` object that b produced, which Ray moves from b's object store to a's (bandwidth = bytes
over the pull time minus the latency). The result is a `Topology` whose nodes are Ray node ids,
so the router's planner prices hops between replicas on different nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from actors.gcs import actor_record
from actors.naming import NAMESPACE, probe_name
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


def start_probes(node_ids: list[str], deployment: str | None = None) -> dict[str, Any]:
    """One probe actor per node, pinned there (named `meshpipe/<deployment>/probe-<node id>` for a deployment)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probes = {}
    for node in node_ids:
        opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        if deployment:
            opts.update(name=probe_name(deployment, node), namespace=NAMESPACE, lifetime="detached",
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


class LinkProber:
    """Keeps the pool's measurements fresh between steps: replicas' inbound waits (every
    `probe_interval_s`, idle replicas too) and, for a measured topology, the links between nodes."""

    def __init__(self, deployment: str, pool: Any, reschedule: Any) -> None:
        self.deployment = deployment
        self.pool = pool  # the ReplicaPool whose replicas and topology this measures
        self.reschedule = reschedule  # called when a replica answers again or is gone (waiting requests move)
        self.probes: dict[str, Any] = {}  # node id -> its ProbeActor

    def names(self) -> list[str]:
        return [probe_name(self.deployment, n) for n in self.probes]

    async def probe_replicas(self) -> None:
        """One round: every live (or due) replica's inbound wait; banned ones come back when they answer."""
        import ray

        now = time.monotonic()
        reps = [r for r in self.pool.table if not r.gone and not r.draining
                and (r.alive or now >= r.banned_until)]  # banned ones after their backoff
        sent = time.time()
        results = await asyncio.gather(*[asyncio.wait_for(r.handle.probe.remote(sent), 5.0) for r in reps],
                                       return_exceptions=True)
        for rep, ms in zip(reps, results):  # gone for good only when Ray's own record says DEAD too
            died = isinstance(ms, ray.exceptions.ActorDiedError) and actor_record(rep.handle)[0] == "DEAD"
            self.observe(rep, ms, now, died)

    def observe(self, rep: Any, ms: Any, now: float, died: bool = False) -> None:
        """Acts on one probe's answer: a round trip in ms, or the exception it raised (`died`: gone for good)."""
        if died:
            rep.gone, rep.alive = True, False
            self.pool.routes.invalidate()
            log.warning("%s is gone for good (restarts used up or killed)", rep.label)
            self.reschedule()  # requests waiting for this stage may have to fail now
        elif isinstance(ms, BaseException):
            if not rep.alive:  # still down: back off further
                rep.ban_s = min(60.0, rep.ban_s * 2)
                rep.banned_until = now + rep.ban_s
        else:
            rep.observe(inbound_ms=ms)
            if not rep.alive and not rep.draining:  # a round sent before a drain began must not readmit it
                rep.alive = True  # answers again (restarted): new sequences may use it
                self.pool.routes.invalidate()
                log.warning("%s answers again: back in the routes", rep.label)
                self.reschedule()

    async def measure_links(self) -> None:
        """Measures the links between the nodes hosting the router and the stages (keeps the last on failure)."""
        try:
            if not self.probes:
                self.probes = start_probes(self.pool.hosts(), self.deployment)
            self.pool.set_topology(await asyncio.to_thread(measure_topology, self.probes))
        except Exception as e:  # noqa: BLE001 - keep the last costs; try again later
            log.warning("measuring the topology failed (keeping the last costs): %s", e)
