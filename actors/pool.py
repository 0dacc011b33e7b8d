"""The replica pool: a deployment's stage replicas, what moving between them costs, and its routes.

Owns the replica table, the topology and host-to-host transfer costs, the planner's route cache,
how each hop of a route encodes, and which replicas are down right now. It adds replicas (the
autoscaler) and drains them, and reports per-stage load. It never drives a step: the router's
lanes and the recovery do, through it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from actors.config import RouterOptions, WireOptions
from actors.errors import DeploymentError
from actors.naming import stage_name
from actors.prefix import PREFILL_TOKEN_MS, PrefixIndex
from actors.replicas import Replica, ReplicaTable
from actors.wire import LinkCodec, LinkInfo, choose_link
from models import MeshpipeError
from topology.errors import TopologyError
from topology.graph import Topology
from topology.planner import HostCosts, Route, RouteCache, plan as plan_route

log = logging.getLogger(__name__)


class ReplicaPool:
    """Stage replicas by stage, their costs and routes; adds and drains replicas at run time."""

    def __init__(self, deployment: str, node_id: str, replicas: list[list[Any]], replica_info: list[list[dict]],
                 options: RouterOptions, wire: WireOptions, topology: Topology | None = None,
                 launcher: Any = None, specs: list[Any] | None = None) -> None:
        self.deployment = deployment
        self.node_id = node_id  # the router's Ray node: where every route starts
        self.options, self.wire = options, wire
        self.message_bytes = options.message_bytes or 4096  # typical activation message, for transfer costs
        self.replica_info = replica_info  # [stage][i] -> the replica's `ready` info
        self.launcher = launcher  # StageLauncher: starts replicas (autoscaler, node loss)
        self.specs = specs or []  # per stage: the layers it holds
        self.table = ReplicaTable([
            [Replica(stage=k, replica=info["replica"], handle=h, host=info["node_id"],
                     name=stage_name(deployment, k, info["replica"]))
             for h, info in zip(handles, infos)]
            for k, (handles, infos) in enumerate(zip(replicas, replica_info))
        ], load_knee=options.load_knee)
        self.topology = topology
        self.costs = self.host_costs(topology)
        self.routes = RouteCache(threshold=options.route_threshold, min_change_ms=0.0)
        self.step_time: dict[int, tuple[float, float]] = {}  # stage -> emulated (s per step, s per token)
        self._links: dict[tuple[int, ...], list[LinkCodec]] = {}  # per route's replicas: how each hop encodes
        self._labels = {r.handle._actor_id.hex(): r.label for r in self.table}
        self._down: dict[tuple[int, int], asyncio.Event] = {}  # set while the watcher sees a replica dead
        self._freeing: dict[str, asyncio.Future] = {}  # sequence -> its earlier run's caches being freed
        self._busy_seen: dict[str, tuple[float, float]] = {}  # replica -> (when, its busy_s then)
        self._busy_since = time.monotonic()  # replicas' busy_ms count from here

    # ---------- costs and routes ----------

    def kv_pools(self) -> dict[tuple[int, int], int]:
        """(stage, replica) -> its KV pool in tokens, as the replicas are now (added, drained, replaced)."""
        return {(s, i["replica"]): i["kv_cache_tokens"] for s, stage in enumerate(self.replica_info) for i in stage}

    def hosts(self) -> list[str]:
        return sorted({self.node_id, *(r.host for r in self.table)})

    def host_costs(self, topo: Topology | None) -> HostCosts:
        """Transfer costs between the hosts of the router and the replicas (Ray node ids)."""
        hosts = self.hosts()
        if topo is None:
            return HostCosts.uniform(hosts, 0.0)
        missing = [h for h in hosts if h not in topo.graph]
        if missing:
            raise DeploymentError(f"the topology has no node for Ray node(s) {missing}: name nodes by Ray node id")
        return HostCosts.from_topology(topo, self.message_bytes)

    def set_topology(self, topo: Topology) -> None:
        """A newly measured topology: costs, routes and link codecs follow."""
        self.topology, self.costs = topo, self.host_costs(topo)
        self.routes.invalidate()
        self._links.clear()

    def refresh_costs(self) -> None:
        """Hosts changed (a replica added, removed or placed anew): transfer costs and routes follow."""
        try:
            self.costs = self.host_costs(self.topology)
        except (MeshpipeError, TopologyError):  # a host not in the measured topology yet: uniform until re-measured
            self.costs = HostCosts.uniform(self.hosts(), 0.0)
        self.routes.invalidate()
        self._links.clear()

    def plan(self, prefixes: PrefixIndex | None = None, hashes: Sequence[bytes] = (), tokens: int = 0,
             steps: int = 1, avoid: frozenset[tuple[int, int]] = frozenset()) -> Route:
        """The cheapest route for a new sequence now (cached until costs move). With a prompt's block
        `hashes` (of `tokens` tokens), each replica also costs the prompt tokens it would compute: fewer
        where it holds the prefix (`PrefixIndex`), so a conversation stays where its history is cached.
        That prefill is paid once while a route's hops and queues are paid every step: it is spread over
        the `steps` the sequence is expected to decode (a slow link outweighs a cached prefix soon).
        The (stage, replica)s in `avoid` (no free KV for it) are left out while their stage has another
        replica; NoReplicaError when one has none: the request waits for blocks."""
        states = self.table.states()
        if avoid:
            for st in states:
                st.alive = st.alive and (st.stage, st.replica) not in avoid
        hits = {(st.stage, st.replica): prefixes.hit_tokens((st.stage, st.replica), hashes)
                for st in states} if prefixes is not None and hashes else {}
        if not any(hits.values()) and not avoid:
            return self.routes.get(states, self.table.num_stages, self.costs, self.node_id)
        for st in states:  # one rate a stage: its replicas' fastest prompt token (measured on large steps)
            rates = [r.prefill_ms for r in self.table.by_stage[st.stage] if r.prefill_ms is not None and r.alive]
            rate = min(rates) if rates else PREFILL_TOKEN_MS
            st.compute_ms += (tokens - hits.get((st.stage, st.replica), 0)) * rate / max(1, steps)
        return plan_route(states, self.table.num_stages, self.costs, self.node_id)

    def lost_stages(self) -> list[int]:
        """The stages whose every replica is gone for good (no route can be planned until one is added)."""
        return [k for k, reps in enumerate(self.table.by_stage) if all(r.gone for r in reps)]

    def links_for(self, route: Route) -> list[LinkCodec]:
        """How each hop of `route` encodes: links[k] is the message into stage k."""
        if route.replicas not in self._links:
            hosts = [self.node_id, *route.hosts]
            w = self.wire
            self._links[route.replicas] = [
                choose_link(self._link_info(a, b), w.codec, w.compress, w.encryption,
                            self.message_bytes, w.int8_block)
                for a, b in zip(hosts, hosts[1:])
            ]
        return self._links[route.replicas]

    def ring_links(self, route: Route) -> list[LinkCodec]:
        """A decode ring's links: links[0] carries the last stage's tokens back to stage 0, links[k] into k."""
        hosts = route.hosts
        w = self.wire
        back = choose_link(self._link_info(hosts[-1], hosts[0]), w.codec, w.compress, w.encryption,
                           self.message_bytes, w.int8_block)
        return [back, *self.links_for(route)[1:]]

    def _link_info(self, a: str, b: str) -> LinkInfo:
        if a == b or self.topology is None:
            return LinkInfo(same_host=a == b, bandwidth_gbps=None)
        if a not in self.topology.graph or b not in self.topology.graph:  # a host placed after a node loss:
            untrusted = any(not e.get("trusted", True) for *_, e in self.topology.graph.edges(data=True))
            return LinkInfo(same_host=False, bandwidth_gbps=None, trusted=not untrusted)  # fail closed
        try:
            path, _ = self.topology.route(a, b, self.message_bytes)
        except TopologyError:
            return LinkInfo(same_host=False, bandwidth_gbps=None)
        edges = [self.topology.link(u, v, self.message_bytes) for u, v in zip(path, path[1:])]
        bws = [e["bandwidth_gbps"] for e in edges if e["bandwidth_gbps"]]
        return LinkInfo(same_host=False, bandwidth_gbps=min(bws) if bws else None,
                        trusted=all(e.get("trusted", True) for e in edges))

    # ---------- replicas' liveness as the router sees it ----------

    def label_of(self, actor_id: str) -> str:
        """`stage-k/replica-r` of an actor id (hex), for errors; "a stage" if unknown."""
        return self._labels.get(actor_id, "a stage")

    def down_event(self, rep: Replica) -> asyncio.Event:
        """Set while the replica is seen dead or restarting: steps through it give up at once."""
        key = (rep.stage, rep.replica)
        if key not in self._down:
            self._down[key] = asyncio.Event()
        return self._down[key]

    def seen_down(self, rep: Replica) -> bool:
        """Gone for good, or seen dead or restarting now: its caches are lost, nothing of a ring runs there."""
        return rep.gone or self.down_event(rep).is_set()

    def ban(self, down: list[Replica], now: float | None = None) -> None:
        """Takes replicas out of the routes with backoff (2 s, doubling to 60 s); gone ones for good."""
        now = time.monotonic() if now is None else now
        for rep in down:
            if not rep.alive:  # banned already (another group's recovery of the same failure)
                continue
            rep.alive = False
            rep.ban_s = min(60.0, rep.ban_s * 2) if rep.ban_s else 2.0
            rep.banned_until = now + rep.ban_s
            log.warning("%s is %s: its sequences move to other replicas", rep.label,
                        "gone" if rep.gone else f"down, banned for {rep.ban_s:.0f} s")
        self.routes.invalidate()

    def replaced(self, rep: Replica, handle: Any, info: dict) -> None:
        """`rep` was placed anew (after its node was lost) as actor `handle` on `info["node_id"]`."""
        self._labels.pop(rep.handle._actor_id.hex(), None)
        rep.handle, rep.host, rep.gone, rep.alive = handle, info["node_id"], False, True
        rep.restarts_seen, rep.compute_ms = 0, None
        self._labels[handle._actor_id.hex()] = rep.label
        self._down.pop((rep.stage, rep.replica), None)
        self.replica_info[rep.stage] = [info if i["replica"] == rep.replica else i
                                        for i in self.replica_info[rep.stage]]
        self.refresh_costs()

    def free_first(self, seq_id: str) -> asyncio.Future | None:
        """A sequence placed again (preempted) whose earlier run's caches are still queued to be freed: they
        are freed now, and it waits for that (its next message starts it anew at position 0, which a
        stage holding the old run refuses as a replay). None when nothing is left to free."""
        if seq_id in self._freeing:
            return self._freeing[seq_id]
        reps = self.table.take_queued(seq_id)
        if not reps:
            return None

        async def free() -> None:  # a dead replica lost the cache anyway
            await asyncio.gather(*[r.handle.free.remote([seq_id]) for r in reps], return_exceptions=True)
        fut = self._freeing[seq_id] = asyncio.ensure_future(free())
        fut.add_done_callback(lambda _: self._freeing.pop(seq_id, None))
        return fut

    def flush_releases(self) -> None:
        """Frees finished sequences' caches on replicas no message is going to soon."""
        for (stage, replica), ids in self.table.take_release().items():
            self.table.get(stage, replica).handle.free.remote(ids)

    # ---------- replicas added and removed at run time (the autoscaler) ----------

    async def add(self, stage: int, timeout_s: float = 600.0) -> str:
        """Starts one more replica of `stage` (Ray finds it a GPU, or its autoscaler a node); routes use it
        once it is ready. Returns its name. Not ready after `timeout_s`, or failed: killed, DeploymentError."""
        import ray

        if self.launcher is None:
            raise DeploymentError("this deployment cannot start replicas (no launcher)")
        replica = 1 + max((r.replica for r in self.table.by_stage[stage]), default=-1)
        handle = self.launcher.launch(self.specs[stage], replica)
        try:
            info = await asyncio.wait_for(handle.ready.remote(), timeout_s)
        except BaseException as e:  # a pending replica would hold its GPU ask (and its name) for good
            ray.kill(handle, no_restart=True)
            if isinstance(e, asyncio.CancelledError):
                raise
            why = f"was not ready after {timeout_s:g} s (no free GPU, and no node came)" \
                if isinstance(e, asyncio.TimeoutError) else f"failed to start ({type(e).__name__})"
            raise DeploymentError(f"a new replica of stage {stage} {why}: it was given up") from None
        if stage in self.step_time:
            await handle.set_step_time.remote(*self.step_time[stage])
        rep = Replica(stage=stage, replica=replica, handle=handle, host=info["node_id"],
                      name=stage_name(self.deployment, stage, replica))
        self.table.add(rep)
        self.replica_info[stage].append(info)
        self._labels[handle._actor_id.hex()] = rep.label
        self.refresh_costs()
        log.warning("%s added (node %s)", rep.label, rep.host[:8])
        return rep.name

    async def drain(self, stage: int, timeout_s: float = 60.0) -> Replica | None:
        """Takes the least-loaded replica of `stage` (never its last live one) out: no new sequences go
        to it, its own finish (or, after `timeout_s`, move: their next step fails over, caches rebuilt
        elsewhere). Returns it, removed from the table, for the caller to kill; None if the stage has a
        single live replica, or is left with none other (the rest died meanwhile): then it serves again."""
        live = self._live(stage)
        if len(live) < 2:
            return None
        rep = min(live, key=lambda r: (len(r.sequences), -r.replica))
        rep.draining, rep.alive = True, False
        self.routes.invalidate()
        end = time.monotonic() + timeout_s
        while rep.sequences and time.monotonic() < end:
            if not self._live(stage):  # the others died while it finished its own: it stays
                return self._undrain(rep)
            await asyncio.sleep(0.05)
        if rep.sequences:  # time's up: the watcher and health checks keep it down, failover moves them
            if not self._live(stage):  # ...to a live replica: with none (restarting, say) it stays
                return self._undrain(rep)
            rep.evicting = True
            self.down_event(rep).set()
            while rep.sequences:
                if not self._live(stage):  # the others went down meanwhile: its own must not fail over to nowhere
                    return self._undrain(rep)
                await asyncio.sleep(0.05)
        while rep.inflight:
            await asyncio.sleep(0.05)
        if not self._live(stage):
            return self._undrain(rep)
        self.table.remove(rep)
        self._labels.pop(rep.handle._actor_id.hex(), None)  # bounded by the replicas there are, not ever were
        self._busy_seen.pop(rep.name, None)  # a later replica may take its name: no stale baselines
        self._down.pop((stage, rep.replica), None)
        self.replica_info[stage] = [i for i in self.replica_info[stage] if i["replica"] != rep.replica]
        self.refresh_costs()
        log.warning("%s drained and removed", rep.label)
        return rep

    def _live(self, stage: int) -> list[Replica]:
        """`stage`'s replicas that take new sequences now."""
        return [r for r in self.table.by_stage[stage] if r.alive and not r.draining and not r.gone]

    def _undrain(self, rep: Replica) -> None:
        """Gives up draining `rep` (no other replica of its stage is live): it takes sequences again, unless
        it is down itself (then the watcher brings it back as any other)."""
        if rep.evicting:  # the drain marked it down, not a failure
            self.down_event(rep).clear()
        rep.draining, rep.evicting = False, False
        rep.alive = not self.seen_down(rep)
        self.routes.invalidate()
        log.warning("%s stays: no other replica of stage %d is live, drain given up", rep.label, rep.stage)
        return None

    async def loads(self) -> list[dict[str, Any]]:
        """Per stage: live replicas, busy fraction since the last call, queue per replica, step ms."""
        now = time.monotonic()
        out = []
        for k, reps in enumerate(self.table.by_stage):
            live = self._live(k)
            got = await asyncio.gather(*[asyncio.wait_for(r.handle.stats.remote(), 5) for r in live],
                                       return_exceptions=True)
            busy = []
            for r, st in zip(live, got):
                if isinstance(st, BaseException):
                    continue
                last_t, last_busy = self._busy_seen.get(r.name, (now, st["busy_s"]))
                self._busy_seen[r.name] = (now, st["busy_s"])
                if st["busy_s"] < last_busy:  # restarted: its count began again, a new baseline (no sample)
                    continue
                busy.append(min(1.0, (st["busy_s"] - last_busy) / (now - last_t)) if now > last_t else 0.0)
            kept = sum(1 for r in reps if not r.draining and not r.gone)  # a restarting one counts (no upscale)
            # no sample (every answer failed, or came from a restart): unknown, and the policy leaves it be
            out.append({"stage": k, "replicas": kept, "busy": sum(busy) / len(busy) if busy else math.nan,
                        "queue": sum(max(0, r.inflight - 1) for r in live) / max(1, len(live)),
                        "step_ms": sum(r.compute_ms or 0.0 for r in live) / max(1, len(live))})
        return out

    def export(self, metrics: Any, active: int, queued: int, now: float) -> None:
        """Load, queue length per replica and pipeline efficiency (mean busy fraction from the traces)."""
        live = [r for r in self.table if r.alive and not r.gone]
        metrics.load(active, queued)
        metrics.queues({(r.stage, r.replica): max(0, r.inflight - 1) for r in live})
        period_ms = (now - self._busy_since) * 1e3
        if period_ms > 0 and live:
            busy = [min(1.0, r.busy_ms / period_ms) for r in live]
            metrics.efficiency.set(sum(busy) / len(busy), metrics.tags)
        for r in self.table:
            r.busy_ms = 0.0
        self._busy_since = now

    async def stage_stats(self) -> list[dict]:
        """Every replica's own stats, or what made it unreachable."""
        reps = list(self.table)
        got = await asyncio.gather(*[asyncio.wait_for(r.handle.stats.remote(), 10) for r in reps],
                                   return_exceptions=True)
        return [x if not isinstance(x, BaseException) else
                {"stage": r.stage, "replica": r.replica, "down": f"{type(x).__name__}"} for r, x in zip(reps, got)]
