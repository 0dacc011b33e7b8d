"""Decode rings, the router's side: the per-token path with the router off it.

A ring runs one route's replicas as a loop (`actors.ring_stage`): stage 0 feeds its lanes, each
stage passes its output to the next over TCP, the last stage samples and sends the tokens back to
stage 0 and, in batches, to the router (a socket per ring, `actors.reports`). The router admits
sequences into the ring of their route (the tail learns their sampling options first), receives
their tokens, and cancels at the head (stop strings, deadlines, cancel). A ring starts when its
route first gets a sequence and stays up while its replicas live; a ring that breaks (a replica died, a channel failed) is stopped on
every member, each live stage forgets the positions the router never saw, and its sequences go
on through the Ray-call path (`StepSender`) whose recovery (failover, restart, KV rebuild) gives
the tokens a clean run gives. Routes whose ring cannot start use that path too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from actors.jobs import Jobs
from actors.channels import node_ip
from actors.pool import ReplicaPool
from actors.reports import ReportServer, Trace
from actors.request import Lane, Request
from actors.ring_stage import RingSpec
from topology.planner import Route

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 30.0  # a ring's members connect within this
CALL_TIMEOUT_S = 10.0  # a break's stop and rewind calls, all members together
BreakCause = Literal["setup failed", "admission failed", "replica died", "replica removed", "member failed", "shutdown"]
ENDED_KEPT = 1024  # requests that left a ring remembered, to free on its members should it break (a pass's worth)
BREAKS_KEPT = 64  # breaks `stats()` lists (`breaks` counts them all)
RETRY_AFTER_S = 30.0  # a route whose ring failed to start uses the Ray-call path this long


@dataclass(eq=False)
class RingLane(Lane):
    """The requests decoding in one ring (the router's lanes' bookkeeping: `_active`, `_release`)."""

    ring: Ring | None = None


@dataclass(eq=False)
class Ring:
    ring_id: str
    route: Route
    handles: list[Any]
    lane: RingLane
    state: str = "starting"  # starting | ready | broken
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    admits: list[Request] = field(default_factory=list)  # waiting for the next admission call
    cancels: list[str] = field(default_factory=list)
    # sequences cancelled here whose release has not come back from the tail: one preempted and placed
    # again waits for it (its old run's caches, tail state and pass in flight must be gone first)
    releasing: set[str] = field(default_factory=set)
    flushing: bool = False
    passes: int = 0  # passes its tail reported (one per lane step)
    # the last requests that left it: the head frees their caches down the ring, unless it breaks first
    ended: deque[Request] = field(default_factory=lambda: deque(maxlen=ENDED_KEPT))


class RingDriver:
    """Starts, feeds and breaks the deployment's rings; `fallback` takes a broken ring's requests."""

    def __init__(self, deployment: str, pool: ReplicaPool, router: Any, lanes: int, incarnation: int,
                 eos_ids: frozenset[int], max_seq_len: int, fallback: Callable[[list[Request]], None],
                 prefill_chunk: int = 1 << 30, on_report: Callable[[str, list, list, list], None] | None = None,
                 on_break: Callable[[str], None] | None = None) -> None:
        self.deployment, self.pool, self.router = deployment, pool, router
        self.lanes, self.incarnation = lanes, incarnation
        self.eos_ids, self.max_seq_len = eos_ids, max_seq_len
        self.fallback = fallback
        self.prefill_chunk = prefill_chunk  # prompt tokens a pass carries
        self.on_break = on_break  # told each break's cause (the router's metrics)
        self.rings: dict[tuple[int, ...], Ring] = {}
        self.by_id: dict[str, Ring] = {}
        self.no_ring_until: dict[tuple[int, ...], float] = {}
        # the last BREAKS_KEPT breaks: at (time.time()), ring, cause, why, skipped, took_s
        self.broken: deque[dict[str, Any]] = deque(maxlen=BREAKS_KEPT)
        self.breaks = 0  # rings broken in all
        self.retransmits = 0
        self.passes = 0  # every ring's passes, broken ones' included (a monotonic step count)
        self._ids = itertools.count()
        self.jobs = Jobs(f"rings of {deployment!r}")
        # the tails' token reports: a socket per ring into the router's event loop (None: Ray calls)
        self.reports = ReportServer(on_report, node_ip()) if on_report is not None else None

    # ---------- admitting and leaving ----------

    def place(self, req: Request) -> Lane | None:
        """The ring lane `req` decodes in (its ring starting if need be); None: use the Ray-call path."""
        key = req.route.replicas
        if self.no_ring_until.get(key, 0.0) > time.monotonic():
            return None
        if any(map(self.pool.seen_down, self.pool.table.on_route(req.route))):
            return None  # a member Ray reports dead or restarting: no ring over it (its setup would fail and
            # keep the route off rings for RETRY_AFTER_S); the Ray-call path's recovery waits or fails over
        ring = self.rings.get(key)
        if ring is None:
            ring = self._start(req.route)
        ring.lane.seqs.append(req)
        ring.admits.append(req)
        self._flush_soon(ring)
        return ring.lane

    def forget(self, req: Request) -> None:
        """`req` left its ring lane (finished, cancelled, timed out): the head drops it if it still runs it."""
        ring = getattr(req.lane, "ring", None)
        if ring is None or ring.state == "broken":
            return
        if req in ring.admits:
            ring.admits.remove(req)
        ring.cancels.append(req.rid)
        ring.releasing.add(req.rid)
        ring.ended.append(req)
        self._flush_soon(ring)

    def running(self) -> list[Request]:
        return [r for ring in self.rings.values() for r in ring.lane.seqs]

    def active(self) -> int:
        return sum(len(ring.lane.seqs) for ring in self.rings.values())

    def report(self, ring_id: str, batch: list[tuple], passes: list[tuple[int, Trace]], released: list[str],
               requests: dict[str, Request], deliver: Callable[..., None], metrics: Any) -> None:
        """A tail's report: each (request id, tokens, logprobs, drafts verified, tokens before) goes to `deliver`;
        each pass's hop times to the pool's costs, its resends to the counters (a release-only message's pass,
        0 tokens, only the latter); `released` lets admissions waiting for them go. A broken ring's late report
        is dropped: the router's record is the truth."""
        ring = self.by_id.get(ring_id)
        if ring is None:
            return
        hops, resent = [], 0
        for tokens, trace in passes:
            resent += int(sum(t[4] for t in trace))
            if tokens:
                ring.passes += 1
                self.passes += 1
                pass_hops = [tuple(t[:4]) for t in trace]
                self.pool.table.observe_trace(pass_hops, tokens)
                hops += pass_hops
        self.retransmits += resent
        metrics.step(sum(len(b[1]) for b in batch), hops, resent)
        for rid, tokens, logprobs, drafted, accepted, before in batch:
            r = requests.get(rid)  # an earlier run of a preempted sequence: its release has not come back yet
            if r is not None and r.lane is ring.lane and len(r.seq.generated) == before and rid not in ring.releasing:
                deliver(r, tokens, logprobs, drafted, accepted)
        if released and ring.releasing:  # after the rows: a row beside its release is of the earlier run
            ring.releasing.difference_update(released)
            if ring.admits:
                self._flush_soon(ring)

    def describe(self) -> list[dict[str, Any]]:
        return [{"ring": r.ring_id, "replicas": [h for h in r.route.replicas], "state": r.state,
                 "sequences": len(r.lane.seqs), "passes": r.passes} for r in self.rings.values()]

    # ---------- starting ----------

    def _start(self, route: Route) -> Ring:
        ring_id = f"{self.deployment}-i{self.incarnation}-{next(self._ids)}-{secrets.token_hex(4)}"
        reps = self.pool.table.on_route(route)
        ring = Ring(ring_id, route, [r.handle for r in reps], RingLane(-1))
        ring.lane.ring = ring
        self.rings[route.replicas] = ring
        self.by_id[ring_id] = ring
        self.jobs.spawn(self._setup(ring, [r.name for r in reps]))
        return ring

    async def _setup(self, ring: Ring, names: list[str]) -> None:
        size, secret = len(ring.handles), secrets.token_bytes(32)
        links = self.pool.ring_links(ring.route)
        try:
            reports = None if self.reports is None else await self.reports.address()
            if reports is not None:
                self.reports.allow(ring.ring_id, secret)
            specs = [RingSpec(ring.ring_id, k, size, links, self.router, ring.handles, names, secret,
                              self.eos_ids, self.max_seq_len, self.prefill_chunk, reports) for k in range(size)]
            addrs = await asyncio.wait_for(asyncio.gather(
                *[h.ring_open.remote(spec, self.lanes) for h, spec in zip(ring.handles, specs)]), SETUP_TIMEOUT_S)
            await asyncio.wait_for(asyncio.gather(
                *[h.ring_start.remote(ring.ring_id, addrs[(k + 1) % size], SETUP_TIMEOUT_S)
                  for k, h in enumerate(ring.handles)]), 2 * SETUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - no ring: this route's sequences take the Ray-call path
            log.warning("ring over %s could not start (%s: %s); its sequences use Ray calls for %g s", names,
                        type(e).__name__, e, RETRY_AFTER_S)
            self.no_ring_until[ring.route.replicas] = time.monotonic() + RETRY_AFTER_S
            await self.break_ring(ring.ring_id, f"setup failed: {type(e).__name__}", cause="setup failed")
            return
        if ring.state == "starting":
            ring.state = "ready"
            ring.ready.set()
            log.info("ring %s over %s is up", ring.ring_id, names)

    # ---------- talking to the head and tail ----------

    def _flush_soon(self, ring: Ring) -> None:
        if not ring.flushing:
            ring.flushing = True
            self.jobs.spawn(self._flush(ring))

    async def _flush(self, ring: Ring) -> None:
        """Sends the queued admissions (the tail's options first) and cancellations, in one call each."""
        try:
            await ring.ready.wait()
            while ring.state == "ready" and (self._admissible(ring) or ring.cancels):
                admits = [r for r in self._admissible(ring) if not r.future.done()]
                ring.admits = [r for r in ring.admits if r.rid in ring.releasing]  # an earlier run still leaving
                cancels, ring.cancels = ring.cancels, []
                head, tail = ring.handles[0], ring.handles[-1]
                if cancels:
                    head.ring_cancel.remote(ring.ring_id, cancels)
                if admits:
                    await tail.ring_params.remote(ring.ring_id, {
                        r.rid: (r.seq.params, len(r.seq.generated)) for r in admits})
                    await head.ring_admit.remote(ring.ring_id, [
                        (r.rid, r.seq.prompt + r.seq.generated, r.seq.cached, len(r.seq.generated), r.seq.params)
                        for r in admits])
        except Exception as e:  # noqa: BLE001 - a member is gone: recovery takes over
            await self.break_ring(ring.ring_id, f"admission failed: {type(e).__name__}: {e}",
                                  cause="admission failed", failure=True)
        finally:
            ring.flushing = False
            if ring.state == "ready" and (self._admissible(ring) or ring.cancels):
                self._flush_soon(ring)

    @staticmethod
    def _admissible(ring: Ring) -> list[Request]:
        """Queued admissions whose earlier run in this ring (a preempted sequence's) has been released."""
        return [r for r in ring.admits if r.rid not in ring.releasing]

    # ---------- breaking ----------

    def watch(self) -> None:
        """Breaks rings with a replica that Ray reports dead or restarting (the router's watcher saw it)."""
        for ring in list(self.rings.values()):
            reps = self._members(ring)
            if any(rep is None for rep in reps):  # drained and removed: its ring goes with it
                self.jobs.spawn(self.break_ring(ring.ring_id, "a replica was removed", cause="replica removed"))
            elif any(map(self.pool.seen_down, reps)):
                self.jobs.spawn(self.break_ring(ring.ring_id, "a replica died", cause="replica died", failure=True))

    def _members(self, ring: Ring) -> list[Any]:
        """The ring's replicas in the table now (None: one removed since, a drain's)."""
        return [self.pool.table.find(s, r) for s, r in enumerate(ring.route.replicas)]

    async def break_over(self, stage: int, replica: int) -> None:
        """Breaks the rings through a replica about to be killed (a drain's), before its members report it."""
        await asyncio.gather(*[self.break_ring(ring.ring_id, "a replica was removed", cause="replica removed")
                               for ring in list(self.rings.values()) if ring.route.replicas[stage] == replica])

    async def break_ring(self, ring_id: str, why: str, *, cause: BreakCause, failure: bool = False) -> None:
        """Stops the ring everywhere, rewinds what the router never saw, hands its requests to `fallback`.
        `why`: what happened, in words; `cause`: its kind (metrics). `failure`: a member died or failed;
        its requests' next step ends a recovery (`Recovery.resumed`)."""
        ring = self.by_id.pop(ring_id, None)
        if ring is None or ring.state == "broken":
            return
        ring.state = "broken"
        ring.ready.set()
        if self.rings.get(ring.route.replicas) is ring:
            del self.rings[ring.route.replicas]
        # a member Ray reports dead or restarting lost its caches: nothing to stop or rewind there, and a
        # call to it could only wait; the others get both calls within one CALL_TIMEOUT_S in all
        members = self._members(ring)
        reps = [rep for rep in members if rep is not None]
        live = [h for h, rep in zip(ring.handles, members) if rep is not None and not self.pool.seen_down(rep)]
        t0 = time.monotonic()
        deadline = t0 + CALL_TIMEOUT_S
        entry = {"at": time.time(), "ring": ring_id, "cause": cause, "why": why,
                 "skipped": len(ring.handles) - len(live), "took_s": None}  # took_s: the handover's, once done
        self.broken.append(entry)
        self.breaks += 1
        if self.on_break is not None:
            self.on_break(cause)
        reqs = [r for r in ring.lane.seqs if not r.future.done()]
        for r in reqs if failure else []:
            r.broken_at = time.monotonic()
        log.warning("ring %s broke (%s): %d sequences continue through Ray calls", ring_id, why, len(reqs))
        await self._each(live, lambda h: h.ring_stop.remote(ring_id), deadline)
        if self.reports is not None:  # after the stops: a tail still reporting is not a failure of its own
            self.reports.forget(ring_id)
        lengths = {r.rid: r.seq.cached for r in reqs}
        if lengths:
            await self._each(live, lambda h: h.rewind.remote(lengths), deadline)
        ring.lane.seqs.clear()
        entry["took_s"] = round(time.monotonic() - t0, 3)
        self.fallback([r for r in reqs if not r.future.done()])
        ended = [r.rid for r in ring.ended if r.future.done()]  # not those preempted, to be admitted again
        for rep in reps:  # their frees may not have gone down the ring before it broke
            rep.free_later(ended)
        self.pool.flush_releases()  # and those that ended during the handover (no head frees them now)

    @staticmethod
    async def _each(handles: list[Any], call: Callable[[Any], Any], deadline: float) -> None:
        """One call per member, concurrently, until `deadline`; a member's failure or silence is ignored."""
        async def one(h: Any) -> None:
            try:
                await asyncio.wait_for(call(h), max(0.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - dead, restarting or stuck: its caches go with the ring
                log.debug("ring member call failed: %s", e)
        await asyncio.gather(*[one(h) for h in handles])

    def stop_all(self) -> None:
        for ring in list(self.rings.values()):
            self.jobs.spawn(self.break_ring(ring.ring_id, "shutdown", cause="shutdown"))
        if self.reports is not None:
            self.reports.close()
