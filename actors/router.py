"""The router: an async Ray actor that admits requests, batches them and drives every step.

Sequences are spread over *lanes*; each lane is one micro-batch that loops on its own, so while
lane 0 runs on stage 1, lane 1 can run on stage 0 (pipelining). A lane's step sends one
envelope down its route (`StepSender`), awaits the sampled tokens from the last stage, and lets
new sequences join at the next step (iteration-level batching).

With several replicas per stage, each sequence gets a route (one replica per stage) when it
starts, the cheapest by the planner with load as queue wait (`ReplicaPool`), and keeps it while
its KV cache lives there; a lane's step sends one envelope per distinct route, concurrently.
The router owns admission, scheduling and the lanes; the pool, the sender, the recovery
(`Recovery`), the journal and the link prober are composed in, each owning its own state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import Any

from actors.detach import background
from actors.errors import BackPressureError, DeploymentError, RequestCancelledError, RequestTimeoutError, \
    StageFailedError
from actors.gcs import own_restarts
from actors.hooks import FaultHooks, ScalingHooks
from actors.jobs import Jobs
from actors.journal import incarnation_of, RequestJournal, ensure_resumed
from actors.metrics import RouterMetrics
from actors.pool import ReplicaPool
from actors.prefix import KvBudget, PrefixCache, expected_steps
from actors.probe import LinkProber
from actors.recovery import Recovery
from actors.request import Lane, Request, RequestIds, check_room, chunked, new_request
from actors.replicas import default_micro_batches, deployed_infos, live_replica_set
from actors import router_views
from actors.ring import RingDriver, RingLane
from actors.sender import StepSender
from actors.specs import RouterSpec
from actors.wire import subkey
from models import Completion, InvalidRequestError, ModelConfig, NonFiniteLogitsError, SamplingParams
from models.generation import encode_prompt
from topology.graph import Topology
from topology.planner import NoReplicaError

log = logging.getLogger(__name__)


class RouterActor(FaultHooks, ScalingHooks):
    def __init__(self, spec: RouterSpec, replicas: list[list[Any]], replica_info: list[list[dict]] | None = None,
                 launcher: Any = None, specs: list[Any] | None = None) -> None:
        import ray

        from models.loading import resolve_source
        from models.tokenizer import load_tokenizer

        self.deployment, self.source, self.rc = spec.deployment, spec.source, spec.options
        self.cfg = ModelConfig.from_dict(spec.model)
        self.tokenizer = load_tokenizer(resolve_source(spec.source))
        self.metrics = RouterMetrics(spec.deployment)
        node_id = ray.get_runtime_context().get_node_id()
        topology = None if spec.topology is None else Topology.from_dict(spec.topology)
        self.measured = topology is None  # no topology given: measure it with probe actors
        self.incarnation = incarnation_of(own_restarts())  # > 0: accepted requests are in the journal
        self.journal = RequestJournal(spec.deployment, key=subkey(spec.key, f"journal:{spec.deployment}"),
                                      finished_kept=self.rc.finished_kept)
        if self.incarnation == 0:
            self.journal.clear()  # a fresh deployment: records of an old one with this name are void
        if replica_info is None:  # started beside its stages (deploy): theirs once they are up, kept for restarts
            replica_info = deployed_infos(replicas, self.journal, self.incarnation)
        if self.incarnation:  # the replicas as they are now (added, drained, placed anew), not as deployed
            replicas, replica_info = live_replica_set(spec.deployment, replicas, replica_info)
        infos = [i for stage in replica_info for i in stage]
        self.rc = self.rc.model_copy(update={"micro_batches": self.rc.micro_batches or default_micro_batches(infos)})
        self.pool = ReplicaPool(spec.deployment, node_id, replicas, replica_info, self.rc, spec.wire,
                                topology, launcher, specs)
        wire_key = subkey(spec.key, f"wire:{spec.deployment}")  # the stages derive the same
        self.sender = StepSender(self.pool, self.rc.hop_mode, wire_key, ray.get_runtime_context().current_actor)
        self.recovery = Recovery(spec.deployment, self.pool, self.sender, self.metrics, self.rc.restart_timeout_s,
                                 wire_key, self._schedule)
        self.prober = LinkProber(spec.deployment, self.pool, self._schedule)
        self.requests: OrderedDict[str, Request] = OrderedDict()
        self.waiting: deque[Request] = deque()
        self.lanes = [Lane(i) for i in range(self.rc.micro_batches or 1)]
        self.rings = RingDriver(spec.deployment, self.pool, ray.get_runtime_context().current_actor, len(self.lanes),
                                self.incarnation, frozenset(self.cfg.eos_ids), self.cfg.max_seq_len, self._fallback,
                                self.rc.prefill_chunk, self.ring_tokens, self.metrics.ring_broken) \
            if self.rc.data_path == "ring" and not self.rc.replicate_every else None
        pool_tokens, block = min(i["kv_cache_tokens"] for i in infos), infos[0]["kv_block_size"]
        self.kv = KvBudget(self.pool.kv_pools, block)  # admission on each replica's own pool
        self.prefix = PrefixCache(block, pool_tokens // block, self.metrics) if infos[0]["prefix_caching"] else None
        self.tokens_generated = 0
        self._rid = RequestIds(spec.deployment)
        self.jobs = Jobs(f"router of {spec.deployment!r}")  # background jobs (cache copies, prefix pins)
        self._resumed: bool | asyncio.Future = self.incarnation == 0  # a Future while resuming
        self.resumed = 0
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        log.info("router for %r: %d stages, replicas per stage %s", spec.deployment, len(replicas),
                 [len(r) for r in replicas])

    # ---------- public API (called through the actor handle) ----------

    async def submit(self, prompt: Any, params: SamplingParams, timeout_s: float | None = None) -> str:
        """Admits one request; returns its id. Raises InvalidRequestError or BackPressureError."""
        return (await self.submit_many([prompt], params, timeout_s))[0]

    async def generate(self, prompts: list[Any], params: SamplingParams,
                       timeout_s: float | None = None) -> list[Completion]:
        """Admits all prompts at once (all or none) and returns their completions in order."""
        await self._resume()
        reqs = await self._admit_new(prompts, [params] * len(prompts), timeout_s)
        try:
            return [await self._await(r) for r in reqs]
        except BaseException:  # one failed (or the caller went away): the rest are not wanted
            for r in reqs:
                if not r.future.done():
                    self._end(r, RequestCancelledError(f"request {r.rid} was cancelled with its batch"))
            raise

    async def submit_many(self, prompts: list[Any], params: SamplingParams | list[SamplingParams],
                          timeout_s: float | None = None) -> list[str]:
        """Admits all prompts at once (all or none); returns their ids (for `result`, which survives a restart).

        `params` applies to every prompt, or is one SamplingParams per prompt."""
        await self._resume()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(plist)} sampling params for {len(prompts)} prompts: give one or one each")
        return [r.rid for r in await self._admit_new(prompts, plist, timeout_s)]

    async def submit_chat(self, messages: list[dict], params: SamplingParams, timeout_s: float | None = None) -> str:
        """Applies the chat template and admits the request; returns its id."""
        return (await self.submit_many([await self.chat_prompt(messages)], params, timeout_s))[0]

    async def chat(self, messages: list[dict], params: SamplingParams, timeout_s: float | None = None) -> Completion:
        return (await self.generate([await self.chat_prompt(messages)], params, timeout_s))[0]

    async def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt the chat template makes of `messages` (ending where the assistant's answer begins);
        rendered off the event loop, which keeps serving every other request meanwhile."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so it cannot chat: pass token ids to generate")
        return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True)

    async def result(self, rid: str) -> Completion:
        await self._resume()
        return await self._await(self._get(rid))

    async def results(self, rids: list[str]) -> list[Completion]:
        """Each request's completion, in order, in one call (a batch's B calls cost B round trips)."""
        await self._resume()
        return [await self._await(self._get(rid)) for rid in rids]

    async def stream_next(self, rid: str, cursor: int, wait_s: float = 10.0) -> dict[str, Any]:
        """Tokens past `cursor` (waits up to `wait_s` for some); `done` with the completion at the end."""
        await self._resume()
        return await router_views.stream_next(self._get(rid), cursor, wait_s, self.tokenizer)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs): a token that is part of a multi-byte character reads "\ufffd"."""
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    async def cancel(self, rid: str) -> bool:
        """Cancels a request (its caches are freed on every stage); False if it had finished."""
        await self._resume()
        req = self.requests.get(rid)
        if req is None or req.future.done():
            return False
        self._end(req, RequestCancelledError(f"request {rid} was cancelled"))
        return True

    def describe(self) -> dict[str, Any]:
        """The deployment: model, stages, replicas, a new request's route and its links, options."""
        return router_views.describe(self)

    def stats(self) -> dict[str, Any]:
        """Counters: active, queued, tokens, retransmits, recoveries, steps, rings, replicas."""
        return router_views.stats(self)

    def routes_mermaid(self) -> str:
        """The replicas as a layered graph, the route a new request would take drawn thick."""
        return router_views.routes_mermaid(self)

    def resend(self, msg_id: int) -> Any:
        """A stage asks again for a step's first message that failed its checksum."""
        return self.sender.resend(msg_id)

    async def shutdown(self) -> None:
        self._closed = True
        for req in list(self.requests.values()):
            if not req.future.done():
                self._end(req, DeploymentError(f"deployment {self.deployment!r} was shut down"))
        for t in self._tasks:
            t.cancel()
        if self.rings:
            self.rings.stop_all()
        await self.journal.close()  # after the requests' last writes: none outlives the deployment

    # ---------- admission ----------

    async def _admit_new(self, prompts: list[Any], plist: list[SamplingParams],
                         timeout_s: float | None) -> list[Request]:
        if self._closed:
            raise DeploymentError(f"deployment {self.deployment!r} is shut down")
        self._room(len(prompts))  # before any tokenisation: a request too big for the queue costs nothing
        ids = await asyncio.to_thread(lambda: [encode_prompt(p, self.cfg, self.tokenizer) for p in prompts])
        reqs = [new_request(self._rid(), i, sp, timeout_s, self.cfg, self.kv) for i, sp in zip(ids, plist)]
        self._admit(reqs)  # they start now; the caller hears of them once journaled
        try:
            await self.journal.flush([r.rid for r in reqs])
        except Exception as e:  # noqa: BLE001 - fail closed: a request no restart could resume is not accepted
            err = DeploymentError(f"the request journal (GCS key-value store) failed: {type(e).__name__}; retry later")
            for r in reqs:
                self._end(r, err)
            raise err from None
        return reqs

    async def _resume(self) -> None:
        """After a restart: frees orphaned caches and re-admits the journal's requests, once (`ensure_resumed`)."""
        await ensure_resumed(self)

    def _active(self) -> int:
        return sum(len(lane.seqs) for lane in self.lanes) + (self.rings.active() if self.rings else 0) + \
            (len(self.prefix.pinning) if self.prefix else 0)

    def _running(self) -> list[Request]:
        return [r for lane in self.lanes for r in lane.seqs] + (self.rings.running() if self.rings else [])

    def _room(self, n: int) -> None:
        check_room(self.deployment, self._active(), len(self.waiting), n, self.rc.max_active_sequences,
                   self.rc.max_queued)

    def _admit(self, reqs: list[Request]) -> None:
        self._ensure_started()
        self._room(len(reqs))
        if len(self.waiting) + len(reqs) > self.rc.max_queued and \
                not self.kv.fits_now([(len(r.seq.prompt), r.kv_tokens) for r in [*self.waiting, *reqs]]):
            raise BackPressureError(f"pipeline {self.deployment!r}: the stages' KV caches are full "
                                    f"({self.kv.used} of {self.kv.blocks} blocks held) and the queue too; retry later")
        for req in reqs:
            self.journal.admit(req)
            self.requests[req.rid] = req
            self.waiting.append(req)
        self._forget_finished()
        self._schedule()

    def _schedule(self) -> None:
        """Moves waiting requests into the least-loaded lanes while slots and KV budget allow."""
        while self.waiting:
            req = self.waiting[0]
            if self._active() >= self.rc.max_active_sequences:
                return
            tokens = req.seq.prompt + req.seq.generated
            hashes = self.prefix.hashes(req) if self.prefix else []
            if hashes and self.prefix.should_wait(hashes):
                return  # most of its prompt is being computed for another request: start on its blocks
            if (freeing := self.pool.free_first(req.rid)) is not None:  # a preempted run's caches go first
                freeing.add_done_callback(lambda _: self._schedule())
                return
            try:
                route = self.pool.plan(self.prefix and self.prefix.index, hashes, len(tokens), expected_steps(req),
                                       self.kv.full(len(tokens), req.kv_tokens))  # around replicas with no room
            except NoReplicaError:
                if not (lost := self.pool.lost_stages()):
                    return  # every replica of a stage is down for now: wait for the probe to readmit one
                doomed = list(self.waiting)
                self.waiting.clear()
                for r in doomed:
                    self._end(r, StageFailedError(self.recovery.all_gone_message(lost[0])))
                return
            if not self.kv.reserve(req.rid, len(tokens), req.kv_tokens, route.replicas):
                return  # the pools are full: wait for blocks to come back
            self.waiting.popleft()
            self.metrics.prompted(prompt_tokens=len(tokens))
            req.route = route
            self.pool.table.assign(route, req.rid)
            if hashes:  # the route's replicas pin the prompt's cached prefix, then it starts where all hold it
                self.prefix.begin(req, hashes)
                self.jobs.spawn(self.prefix.pin_then(req, hashes, [r.handle for r in self.pool.table.on_route(route)],
                                                     self._place, self._schedule))
            else:
                self._place(req)

    def _place(self, req: Request) -> None:
        req.lane = self.rings.place(req) if self.rings else None
        if req.lane is None:  # the Ray-call path: a lane of the router's own loop
            self._to_lane(req)

    def _preempt(self, req: Request) -> None:
        """A sequence whose blocks cannot grow goes back to the queue's front; its cached blocks make the
        recompute cheap when it starts again (tokens so far are kept)."""
        self._release(req)
        req.route, req.seq.cached = None, 0
        self.kv.preemptions += 1
        self.waiting.appendleft(req)
        log.info("request %s preempted at %d tokens: the KV pools are full", req.rid, len(req.seq.generated))

    def _to_lane(self, req: Request) -> None:
        lane = min(self.lanes, key=lambda ln: len(ln.seqs))
        lane.seqs.append(req)
        req.lane = lane
        lane.wake.set()

    def _fallback(self, reqs: list[Request]) -> None:
        """A broken ring's requests: on through Ray calls, whose recovery rebuilds what a dead stage lost."""
        for req in reqs:
            if not req.future.done():
                self._to_lane(req)

    def _ensure_started(self) -> None:
        if self._tasks:
            return
        rc = self.rc
        self._tasks = [background(self._run_lane(lane)) for lane in self.lanes]
        self._tasks.append(background(self._every(0.05, self._reap_timeouts)))
        if rc.probe_interval_s > 0:
            self._tasks.append(background(self._every(rc.probe_interval_s, self._probe)))
        if rc.checkpoint_interval_s > 0:
            self._tasks.append(background(self._every(
                rc.checkpoint_interval_s, lambda: self.journal.checkpoint(self._running()))))
        if rc.watch_interval_s > 0:
            self._tasks.append(background(self._every(rc.watch_interval_s, self._watch)))
        if self.measured and rc.topology_refresh_s > 0 and len(self.pool.hosts()) > 1:
            self._tasks.append(background(self._every(rc.topology_refresh_s, self.prober.measure_links,
                                                      first=True)))

    async def _watch(self) -> None:
        if self._active():
            await self.recovery.watch_once()
            if self.rings:
                self.rings.watch()

    def _every(self, seconds: float, job: Any, first: bool = False) -> Any:
        return self.jobs.every(seconds, job, lambda: self._closed, first)

    async def _probe(self) -> None:
        self.pool.export(self.metrics, self._active(), len(self.waiting), time.monotonic())
        await self.prober.probe_replicas()

    # ---------- the step loop ----------

    async def _run_lane(self, lane: Lane) -> None:
        while not self._closed:  # an unexpected error (a GCS hiccup) must not end the lane: log, go on
            try:
                await self._lane_step(lane)
            except Exception as e:  # noqa: BLE001
                log.exception("lane %d: step failed (%s); the lane goes on", lane.index, type(e).__name__)
                await asyncio.sleep(0.05)

    async def _lane_step(self, lane: Lane) -> None:
        """One step of a lane: its sequences' next inputs down their routes, then their tokens."""
        if not lane.seqs:
            self.pool.flush_releases()
            lane.wake.clear()
            await lane.wake.wait()
            return
        lane.step += 1
        groups: dict[tuple[int, ...], list[Request]] = {}  # by replicas: a route's cost moves with load
        for r in lane.seqs:
            groups.setdefault(r.route.replicas, []).append(r)
        groups = {key: chunked(reqs, self.rc.prefill_chunk) for key, reqs in groups.items()}
        tokens = [sum(len(r.seq.next_input()[:r.chunk or None]) for r in reqs) for reqs in groups.values()]
        with self.pool.table.carrying([r.rid for reqs in groups.values() for r in reqs]):  # freed once landed
            outs = await asyncio.gather(*[self.sender.step(lane.step, reqs[0].route, reqs)
                                          for reqs in groups.values()], return_exceptions=True)
            for reqs, out, n_tokens in zip(groups.values(), outs, tokens):
                if isinstance(out, BaseException) and self.recovery.recoverable(out):
                    try:  # a recovery rebuilds its requests' caches: one ended meanwhile is freed after it
                        out = await self.recovery.recover(lane.step, reqs, out)
                    except Exception as e:  # noqa: BLE001 - recovery failed: fail these requests below
                        out = e
                if isinstance(out, BaseException):  # any stage failure fails these requests
                    err = self.recovery.stage_error(out)
                    for r in reqs:
                        if not r.future.done():
                            self._end(r, err)
                    continue
                self._landed(lane, reqs, out, n_tokens)
        self._schedule()

    def _landed(self, lane: Lane, reqs: list[Request], out: Any, n_tokens: int) -> None:
        """A step's sampled tokens: appended to their sequences; finished ones complete."""
        self.pool.table.observe_trace(out.trace, n_tokens)
        self.metrics.step(len(reqs), out.trace, out.retransmits)
        self.recovery.resumed(reqs)  # a ring broke under them: their first step since ends the recovery
        if self.rc.replicate_every and lane.step % self.rc.replicate_every == 0:
            self.jobs.spawn(self.recovery.replicate(reqs, reqs[0].route))
        for r, token, lp in zip(reqs, out.sampled, out.logprobs):
            if r.chunk:  # a prompt chunk went through: its positions are cached, nothing was sampled
                r.seq.cached, r.chunk = r.seq.cached + r.chunk, 0
            else:
                self._deliver(r, [token], [lp])

    def _deliver(self, r: Request, tokens: list[int], logprobs: list[Any], drafted: int | None = None,
                 accepted: int = 0) -> None:
        """A step's token for `r`, or a pass's (the first `accepted` confirm drafts); a finished `r` completes."""
        if r.future.done():  # cancelled or timed out while the step was in flight
            return
        counted = drafted is not None and r.seq.params.speculative
        try:
            taken = r.seq.add_pass(tokens, logprobs, self.tokenizer, drafted if counted else None, accepted)
        except NonFiniteLogitsError as e:  # this sequence's logits were NaN: it ends, the step's others go on
            return self._end(r, e)
        self.tokens_generated += taken
        if counted:
            self.metrics.speculated(drafted, min(accepted, taken))
        r.changed.set()
        if self.prefix:
            self.prefix.first_token(r.rid)
        if not r.seq.done and not self.kv.grow(r.rid, len(r.seq.prompt) + len(r.seq.generated), r.kv_tokens, r.route):
            self._preempt(r)
        if r.seq.done:
            completion = r.seq.completion(self.tokenizer)
            completion.route = [rep.name for rep in self.pool.table.on_route(r.route)]
            self._release(r)
            self.journal.finish(r, completion)  # a late `result` after a restart finds it
            r.future.set_result(completion)
            self.metrics.finished(completion.finish_reason)

    # ---------- decode rings report here (actors.ring_stage) ----------

    def ring_tokens(self, ring_id: str, batch: list[tuple], passes: list[tuple[int, list[list[float]]]],
                    released: list[str]) -> None:
        """A ring tail's report since its last (`actors.reports.Report`): rows, passes, released ids."""
        if self.rings:
            self.rings.report(ring_id, batch, passes, released, self.requests, self._deliver, self.metrics)
            self._schedule()

    async def ring_failed(self, ring_id: str, member: str, reason: str) -> None:
        """A ring member's loop failed (a channel closed, a message stayed corrupt): recover its requests."""
        if self.rings:
            log.warning("ring %s: %s failed: %s", ring_id, member, reason)
            await self.rings.break_ring(ring_id, f"{member}: {reason}", cause="member failed", failure=True)

    # ---------- ending requests ----------

    def _release(self, req: Request) -> None:
        """Takes a request out of its lane and queues its caches to be freed on its route (a live ring's head
        frees them itself; a broken ring's members keep them, rewound, unless told so here)."""
        lane, ring = req.lane, isinstance(req.lane, RingLane) and getattr(req.lane.ring, "state", "") != "broken"
        placed = lane is not None and req in lane.seqs
        if placed:
            if ring:
                self.rings.forget(req)  # the ring's head frees its caches
            lane.seqs.remove(req)
            lane.wake.set()
        if placed or self.prefix and req.rid in self.prefix.pinning:
            self.kv.release(req.rid)
            if self.prefix:
                self.prefix.ended(req)
            if req.route is not None:
                self.pool.table.finish(req.route, req.rid, release=not ring)
                if not placed:  # pinned blocks, and no message is going that way for it
                    self.pool.flush_releases()
            for stage, (replica, _) in req.copies.items():  # the standby's copies go too (a drained one's are gone)
                if (standby := self.pool.table.find(stage, replica)) is not None:
                    standby.release.append(req.rid)
            req.copies.clear()
        req.lane = None

    def _end(self, req: Request, err: Exception) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        if not req.future.done():
            self.journal.drop(req.rid)
            self.metrics.finished(type(err).__name__)
            req.future.set_exception(err)
            req.future.exception()  # mark retrieved: a caller may never ask
        req.changed.set()
        self._schedule()

    def _reap_timeouts(self) -> None:
        now = time.monotonic()
        for req in [r for r in self.requests.values() if r.deadline is not None and not r.future.done()]:
            if now > req.deadline:
                self._end(req, RequestTimeoutError(f"request {req.rid} timed out after {len(req.seq.generated)} tokens"))

    async def _await(self, req: Request) -> Completion:
        return await asyncio.shield(req.future)

    def _get(self, rid: str) -> Request:
        req = self.requests.get(rid)
        if req is None:
            raise InvalidRequestError(f"no request {rid!r} in deployment {self.deployment!r} (finished long ago?)")
        return req

    def _forget_finished(self) -> None:
        done = [rid for rid, r in self.requests.items() if r.future.done()]
        for rid in done[: max(0, len(done) - self.rc.finished_kept)]:
            del self.requests[rid]
            self.journal.drop(rid)
