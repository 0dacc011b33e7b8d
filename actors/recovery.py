"""Recovery from stage replicas that die: watch, fail over, wait, re-place, rebuild, replicate.

`topology.failover` decides (pure); this class acts: it watches replicas' states in the GCS while
steps run, moves a failed stage's sequences to a live replica of the same stage (or waits for
Ray's restart, or starts the replica anew on another node when its node is lost), rebuilds the
KV positions a replica lacks in one batched message per stage, re-runs the failed step, and keeps
incremental KV copies on standby replicas (`replicate_every`) so a failover rebuilds only the tail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from actors.errors import StageFailedError
from actors.gcs import actor_records
from actors.metrics import RouterMetrics
from actors.pool import ReplicaPool
from actors.replicas import Replica
from actors.request import Request
from actors.sender import RouteBrokenError, StepSender
from actors.wire import Envelope, Header, OutOfOrderError
from models import MeshpipeError
from topology.failover import Health, choose_node, failover
from topology.planner import Route

log = logging.getLogger(__name__)

RECOVERIES_KEPT = 256  # recoveries `stats()` lists (`recovered` counts them all)


class Recovery:
    """Acts on the failover policy for one deployment's routes."""

    def __init__(self, deployment: str, pool: ReplicaPool, sender: StepSender, metrics: RouterMetrics,
                 restart_timeout_s: float, key: bytes | None, reschedule: Callable[[], None],
                 actor_states: Callable[[Sequence[Any]], list[tuple[str, int]]] = actor_records) -> None:
        self.deployment = deployment
        self.pool, self.sender, self.metrics = pool, sender, metrics
        self.restart_timeout_s = restart_timeout_s  # how long a step waits for a dead replica to come back
        self.key = key
        self.reschedule = reschedule  # the router schedules waiting requests again (a replica came back)
        self.actor_states = actor_states  # Ray's record of each of some actors: (state, restarts)
        # per recovered step, or ring broken by a failure once its requests stepped again: (time.time() at
        # its end, seconds in all, seconds of them failing over or waiting for a restart)
        self.recoveries: deque[tuple[float, float, float]] = deque(maxlen=RECOVERIES_KEPT)
        self.recovered = 0  # recoveries in all (the deque keeps the last RECOVERIES_KEPT)
        self.copied_positions = 0  # KV positions copied to standbys (replicate_every)
        self.rebuilt_positions = 0  # KV positions recomputed by recoveries
        self.replacements = 0  # replicas placed anew after a node loss
        self._copying: set[str] = set()  # sequences whose caches are being copied now

    # ---------- noticing ----------

    async def watch_once(self) -> None:
        """Reads every replica's state from the GCS once (the router calls it every `watch_interval_s` while
        steps are in flight), in one read off the event loop.

        Ray marks a killed actor RESTARTING (or DEAD) within milliseconds, while a call to it fails
        only once it is back (~2 s): watching lets a replica's death fail its steps at once.
        """
        reps = [rep for rep in self.pool.table if not rep.gone]
        states = await asyncio.to_thread(self.actor_states, [rep.handle for rep in reps])
        for rep, (st, restarts) in zip(reps, states):
            if rep.gone:  # taken out while the read ran
                continue
            event = self.pool.down_event(rep)
            if st in ("RESTARTING", "DEAD") and not event.is_set():
                log.warning("%s is %s", rep.label, st.lower())
                event.set()
            elif st == "ALIVE" and not rep.evicting:
                event.clear()
                if not rep.alive and not rep.draining and rep.restarts_seen < restarts:
                    rep.restarts_seen = restarts
                    rep.alive = True  # Ray restarted it (empty caches): usable at once, no backoff
                    self.pool.routes.invalidate()
                    log.warning("%s restarted: back in the routes", rep.label)
                    self.reschedule()

    @staticmethod
    def recoverable(e: BaseException) -> bool:
        """A dead or restarting stage actor, or one that came back without its cache."""
        import ray

        exc = ray.exceptions
        return isinstance(e, (exc.RayActorError, exc.ActorUnschedulableError, RouteBrokenError)) or isinstance(
            getattr(e, "cause", None), OutOfOrderError)

    def stage_error(self, e: BaseException) -> MeshpipeError:
        """The typed error a failed step's requests end with, naming the stage."""
        if isinstance(e, StageFailedError):  # recovery's own verdict, already naming the stage
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, MeshpipeError):
            return StageFailedError(f"a stage rejected the step: {cause}")
        actor = getattr(e, "actor_id", None)
        label = self.pool.label_of(actor if isinstance(actor, str) else getattr(actor, "hex", lambda: "")())
        log.warning("step failed at %s: %s", label, e)
        kind = type(cause).__name__ if isinstance(cause, BaseException) else type(e).__name__
        # never Ray's text: it carries the remote traceback, the process id and the node's address
        return StageFailedError(f"{label} of deployment {self.deployment!r} failed: {kind} (the router's log "
                                "has the details)")

    def all_gone_message(self, stage: int) -> str:
        reps = self.pool.table.by_stage[stage]
        gone = ", ".join(r.label for r in reps if r.gone)
        if all(r.gone for r in reps):
            return (f"stage {stage} of deployment {self.deployment!r} has no replica left ({gone} are gone for "
                    "good: restarts used up or killed): redeploy, or deploy with more replicas or max_restarts")
        return (f"stage {stage} of deployment {self.deployment!r} lost {gone} for good and no route reaches its "
                "other replicas (their hosts are unreachable from the route): check the links, or add a replica")

    # ---------- recovering a step ----------

    async def recover(self, step: int, reqs: list[Request], err: BaseException) -> Envelope:
        """Fails over the route's dead replicas, rebuilds lost caches (batched), re-runs the failed step.

        `topology.failover` decides: a failed stage moves to a live replica of the same stage (the
        others keep theirs), or is waited for while Ray restarts it, or fails the step when none
        is left. A stage that lost positions gets them back as one "rebuild" message: token ids
        for stage 0, stage k-1's output history otherwise. Surviving stages are not touched; the
        failed step is re-sent as a "rebuild" so stages that had applied it rewind instead of
        appending twice. Sampling is seeded per position, so the tokens are those of a clean run.
        """
        t0 = time.monotonic()
        deadline = t0 + self.restart_timeout_s
        log.warning("step %d of %d sequences failed (%s): recovering route %s", step, len(reqs),
                    type(err).__name__, " -> ".join(r.label for r in self.pool.table.on_route(reqs[0].route)))
        waited = 0.0
        while True:
            t1 = time.monotonic()
            route = await self.failover(reqs, deadline)
            waited += time.monotonic() - t1
            try:
                await self.rebuild(step, reqs, route)
                out = await self.sender.step(step, route, reqs, kind="rebuild")
                break
            except Exception as e:  # noqa: BLE001 - another replica died meanwhile: fail over again
                if not self.recoverable(e) or time.monotonic() >= deadline:
                    raise
                log.warning("recovery of step %d interrupted (%s): again", step, type(e).__name__)
        self.resumed(reqs, t0, waited)
        return out

    def resumed(self, reqs: list[Request], t0: float | None = None, waited: float = 0.0) -> None:
        """Records one recovery of these requests, from `t0` or the break of the ring they were on (whichever
        came first) to now; nothing when neither (a plain step)."""
        since = [r.broken_at for r in reqs if r.broken_at is not None] + ([] if t0 is None else [t0])
        if not since:
            return
        for r in reqs:
            r.broken_at = None
        took = time.monotonic() - min(since)
        self.recoveries.append((time.time(), took, waited))
        self.recovered += 1
        self.metrics.recovered(took)

    def standbys(self, reqs: list[Request]) -> dict[int, int]:
        """Per stage, the standby replica holding copies for most of these sequences."""
        out = {}
        for k in range(self.pool.table.num_stages):
            votes = [r.copies[k][0] for r in reqs if k in r.copies]
            if votes:
                out[k] = max(set(votes), key=votes.count)
        return out

    async def failover(self, reqs: list[Request], deadline: float) -> Route:
        """Acts on `topology.failover` until every replica on the sequences' route answers; returns it."""
        table = self.pool.table
        route = reqs[0].route
        while True:
            reps = table.on_route(route)
            health = await asyncio.gather(*[self.health(rep) for rep in reps])
            if all(h == Health.UP for h in health):
                return route
            for rep, h in zip(reps, health):
                rep.gone = rep.gone or h == Health.GONE
            decision = failover(route, health, table.states(), table.num_stages, self.pool.costs,
                                self.pool.node_id, prefer=self.standbys(reqs))
            lost = [k for k in decision.gone + decision.wait
                    if self.pool.launcher is not None and not _node_alive(reps[k].host)]
            if lost:  # its node is gone: start it anew on a node with room
                for k in lost:
                    await self.replace(reps[k], [r.host for r in reps if r is not reps[k]], deadline)
                continue
            if decision.gone:
                raise StageFailedError(self.all_gone_message(decision.gone[0]))
            if decision.moved:
                self.metrics.rerouted(len(reqs))
                self.pool.ban([reps[k] for k in decision.moved])
                for r in reqs:
                    table.move(route, decision.route, r.rid)
                    r.route = decision.route
                    for k in decision.moved:  # the standby (if it was one) is now the primary
                        if r.copies.get(k, (None,))[0] == decision.route.replicas[k]:
                            del r.copies[k]
                route = decision.route
                log.warning("%d sequences moved to %s", len(reqs),
                            " -> ".join(r.label for r in table.on_route(route)))
                continue  # check the new route's replicas too
            for k in decision.wait:
                await self.wait_alive(reps[k], deadline)

    async def health(self, rep: Replica, timeout_s: float = 1.0) -> Health:
        """Ray's record of the actor (a busy replica is not a dead one); a ping only if that is unreadable."""
        import ray

        if rep.gone:
            return Health.GONE
        if rep.evicting:  # a drained replica past its timeout: alive, but its sequences must move
            return Health.DOWN
        st = self.actor_states([rep.handle])[0][0]
        if st == "UNKNOWN":
            try:
                await asyncio.wait_for(rep.handle.__ray_ready__.remote(), timeout_s)
                st = "ALIVE"
            except ray.exceptions.ActorDiedError:
                st = "DEAD"
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                st = "RESTARTING"
        if st == "ALIVE":
            self.pool.down_event(rep).clear()
            return Health.UP
        return Health.GONE if st == "DEAD" else Health.DOWN

    async def wait_alive(self, rep: Replica, deadline: float) -> None:
        """Waits for a restarting actor; StageFailedError at `deadline`; marks it gone if Ray gives it up."""
        while True:
            health = await self.health(rep)
            if health == Health.UP:
                return
            if health == Health.GONE:  # dead for good: the failover loop decides again
                rep.gone = True
                return
            if self.pool.launcher is not None and not _node_alive(rep.host):  # the failover loop re-places it
                return
            if time.monotonic() >= deadline:
                raise StageFailedError(
                    f"{rep.label} of deployment {self.deployment!r} did not come back within "
                    f"{self.restart_timeout_s:g} s: its node may be lost or the cluster has no room to "
                    "restart it")
            await asyncio.sleep(0.05)

    async def replace(self, rep: Replica, near: list[str], deadline: float) -> None:
        """Places a lost replica anew (`topology.failover.choose_node`) with hard node affinity; its caches
        are rebuilt by the recovery that follows."""
        import ray
        from ray._private.state import state
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        launcher = self.pool.launcher
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        free = {n: res for n, res in state.available_resources_per_node().items() if n in alive}
        need = {"GPU": float(launcher.resources.get("num_gpus", 0) or 0),
                "CPU": float(launcher.resources.get("num_cpus", 0) or 0)}
        node = choose_node(free, {k: v for k, v in need.items() if v}, exclude={rep.host}, near=near)
        if node is None:
            raise StageFailedError(f"{rep.label} of deployment {self.deployment!r} lost its node and no other node "
                                   f"has {need} free: add a node (or let the cluster autoscaler add one)")
        log.warning("%s lost its node %s: placing it anew on %s", rep.label, rep.host[:8], node[:8])
        try:
            ray.kill(rep.handle, no_restart=True)  # frees its name if Ray still holds it
        except Exception:  # noqa: BLE001 - already dead
            pass
        spec = self.pool.specs[rep.stage]
        while True:
            try:
                handle = launcher.launch(spec, rep.replica, {
                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)})
                break
            except ValueError:  # the old actor's name is released a moment after it is dead
                if time.monotonic() > deadline:
                    raise StageFailedError(f"{rep.label}: its name stayed taken; cannot place it anew") from None
                await asyncio.sleep(0.1)
        info = await asyncio.wait_for(handle.ready.remote(), max(1.0, deadline - time.monotonic()))
        self.pool.replaced(rep, handle, info)
        self.replacements += 1

    # ---------- caches: rebuild and standby copies ----------

    async def rebuild(self, step: int, reqs: list[Request], route: Route) -> None:
        """Gives every replica on `route` the cached positions it lacks, stage by stage, batched (its lane
        step holds the sequences `carrying`)."""
        reps = self.pool.table.on_route(route)
        ids = [r.rid for r in reqs]
        needed = [r.seq.cached for r in reqs]
        links = self.pool.links_for(route)
        held = await asyncio.gather(*[rep.handle.have.remote(ids) for rep in reps])  # [stage][seq] (cached, first)
        starts = [[min(cached, needed[i]) for i, (cached, _) in enumerate(row)] for row in held]
        for k in range(len(reps) - 1, 0, -1):  # stage k-1 replays from its history's first position at best:
            for i, (_, first) in enumerate(held[k - 1]):  # recompute it from earlier when k needs more
                if starts[k][i] < first:
                    starts[k - 1][i] = min(starts[k - 1][i], starts[k][i])
        for k, rep in enumerate(reps):
            have = starts[k]
            todo = [i for i, h in enumerate(have) if h < needed[i]]
            if not todo:
                continue
            toks = [t for i in todo for t in (reqs[i].seq.prompt + reqs[i].seq.generated)[have[i]:needed[i]]]
            header = Header(kind="rebuild", step=step, msg_id=self.sender.next_id(), attempt=0, sender="router",
                            seq_ids=[ids[i] for i in todo], starts=[have[i] for i in todo],
                            lengths=[needed[i] - have[i] for i in todo], release=[], tokens=toks)
            if k == 0:
                env: Any = Envelope.seal(header, torch.tensor(toks, dtype=torch.long), links[0], self.key, links=links)
            else:
                env = reps[k - 1].handle.replay.remote(header, links)
            await rep.handle.forward.remote(env, [reqs[i].seq.params for i in todo])
            self.rebuilt_positions += sum(header.lengths)
            log.warning("rebuilt %d positions of %d sequences on %s", sum(header.lengths), len(todo), rep.label)

    async def replicate(self, reqs: list[Request], route: Route) -> None:
        """Copies the sequences' new KV positions on every stage of `route` to a standby replica there.

        The standby is the least-loaded other live replica of the stage; a sequence's copy keeps
        its standby, so each copy sends only the positions since the last one. On failover the
        sequences move to their standby (`failover(prefer=...)`) and only the tail is rebuilt.
        """
        reqs = [r for r in reqs if r.rid not in self._copying and not r.future.done()]
        if not reqs:
            return
        table = self.pool.table
        self._copying.update(r.rid for r in reqs)
        try:
            with table.carrying([r.rid for r in reqs]):  # no free overtakes a copy on its way
                for k, rep in enumerate(table.on_route(route)):
                    copied = await self._copy(k, rep, reqs)  # not `+= await`: other copies count meanwhile
                    self.copied_positions += copied
        finally:
            self._copying.difference_update(r.rid for r in reqs)

    async def _copy(self, k: int, rep: Any, reqs: list[Request]) -> int:
        """Stage k's copies of the sequences to its standby; returns the positions copied."""
        table = self.pool.table
        others = [o for o in table.by_stage[k] if o is not rep and o.alive]
        if not others:
            return 0
        chosen = {r.copies[k][0] for r in reqs if k in r.copies}
        standby = next((o for o in others if o.replica in chosen), None) or \
            min(others, key=lambda o: (len(o.sequences), o.replica))
        starts = [r.copies[k][1] if r.copies.get(k, (None,))[0] == standby.replica else 0 for r in reqs]
        for r in reqs:
            standby.keep(r.rid)
        try:
            refs, ends = await rep.handle.replicate.remote(standby.handle, [r.rid for r in reqs], starts)
            await refs[0]
        except Exception:  # the standby holds less than its copies say (Ray restarted it, or a new replica took
            for r in reqs:  # its id): the next copy starts from position 0, not past what it holds for good
                if r.copies.get(k, (None,))[0] == standby.replica:
                    r.copies.pop(k)
            raise
        for r, end in zip(reqs, ends):
            old = r.copies.get(k)
            if old and old[0] != standby.replica and (was := table.find(k, old[0])) is not None:
                was.release.append(r.rid)
            if r.future.done():  # it ended during the copy: its release knew nothing of this one
                standby.release.append(r.rid)
                r.copies.pop(k, None)
            else:
                r.copies[k] = (standby.replica, end)
        return sum(e - s for e, s in zip(ends, starts))


def _node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())
