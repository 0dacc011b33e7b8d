"""The router: an async Ray actor that admits requests, batches them and drives every step.

Sequences are spread over *lanes*; each lane is one micro-batch that loops on its own, so while
lane 0 runs on stage 1, lane 1 can run on stage 0 (pipelining). A lane's step sends one
envelope down the stage chain as ObjectRefs (`stage_k.forward.remote(ref_{k-1})`), awaits the
sampled tokens from the last stage, and lets new sequences join at the next step
(iteration-level batching).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.envelope import Envelope
from actors.errors import (
    BackPressureError,
    DeploymentError,
    RequestCancelledError,
    RequestTimeoutError,
    StageFailedError,
)
from models import Completion, InvalidRequestError, MeshpipeError, ModelConfig, SamplingParams, SequenceState
from models.generation import encode_prompt

log = logging.getLogger(__name__)


@dataclass
class RouterConfig:
    max_active_sequences: int = 64  # sequences decoding at once
    max_queued: int = 256  # admitted requests waiting for a slot; beyond this -> BackPressureError
    max_kv_tokens: int = 262144  # sum of (prompt + max_new_tokens) over active sequences
    micro_batches: int = 1  # lanes: micro-batches in flight down the pipeline at once
    hop_mode: str = "router"  # "router": the router chains ObjectRefs; "push": stage k calls stage k+1
    finished_kept: int = 1024  # finished requests remembered for late `result`/`stream_next` calls


@dataclass
class Request:
    rid: str
    seq: SequenceState
    kv_tokens: int  # reserved KV budget: prompt + max_new_tokens
    deadline: float | None  # time.monotonic() after which it times out
    future: asyncio.Future
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lane: Lane | None = None


@dataclass
class Lane:
    index: int
    seqs: list[Request] = field(default_factory=list)
    release: list[str] = field(default_factory=list)  # finished sequences to free on every stage
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0


class RouterActor:
    def __init__(self, deployment: str, source: str | Path, config: dict, stages: list[Any],
                 stage_info: list[dict], router_config: dict | None = None) -> None:
        import ray

        from models.loading import resolve_source
        from models.tokenizer import load_tokenizer

        self.deployment = deployment
        self.source = str(source)
        self.cfg = ModelConfig.from_dict(config)
        self.tokenizer = load_tokenizer(resolve_source(source))
        self.stages = stages
        self.stage_info = stage_info
        self.rc = RouterConfig(**(router_config or {}))
        self._actor_label = {h._actor_id.hex(): f"stage-{i}" for i, h in enumerate(stages)}
        self.requests: OrderedDict[str, Request] = OrderedDict()
        self.waiting: deque[Request] = deque()
        self.lanes = [Lane(i) for i in range(self.rc.micro_batches)]
        self.kv_reserved = 0
        self.tokens_generated = 0
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._ray = ray
        log.info("router for %r: %d stages, route %s", deployment, len(stages),
                 " -> ".join(f"stage-{i}/replica-0" for i in range(len(stages))))

    # ---------- public API (called through the actor handle) ----------

    async def submit(self, prompt: Any, params: SamplingParams, timeout_s: float | None = None) -> str:
        """Admits one request; returns its id. Raises InvalidRequestError or BackPressureError."""
        req = self._new_request(prompt, params, timeout_s)
        self._admit([req])
        return req.rid

    async def generate(self, prompts: list[Any], params: SamplingParams,
                       timeout_s: float | None = None) -> list[Completion]:
        """Admits all prompts at once (all or none) and returns their completions in order."""
        reqs = [self._new_request(p, params, timeout_s) for p in prompts]
        self._admit(reqs)
        try:
            return [await self._await(r) for r in reqs]
        except BaseException:  # one failed (or the caller went away): the rest are not wanted
            for r in reqs:
                if not r.future.done():
                    self._end(r, RequestCancelledError(f"request {r.rid} was cancelled with its batch"))
            raise

    async def chat(self, messages: list[dict], params: SamplingParams,
                   timeout_s: float | None = None) -> Completion:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so it cannot chat: pass token ids to generate")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return (await self.generate([prompt], params, timeout_s))[0]

    async def result(self, rid: str) -> Completion:
        return await self._await(self._get(rid))

    async def stream_next(self, rid: str, cursor: int, wait_s: float = 10.0) -> dict[str, Any]:
        """Tokens past `cursor` (waits up to `wait_s` for some); `done` with the completion at the end."""
        req = self._get(rid)
        if len(req.seq.generated) <= cursor and not req.future.done():
            req.changed.clear()
            try:
                await asyncio.wait_for(req.changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        if req.future.done():
            completion = await self._await(req)  # raises the request's error, if any
            return {"token_ids": completion.token_ids[cursor:], "done": True, "completion": completion}
        text = self.tokenizer.decode(req.seq.generated) if self.tokenizer else ""
        return {"token_ids": req.seq.generated[cursor:], "text": text, "done": False, "completion": None}

    async def cancel(self, rid: str) -> bool:
        """Cancels a request (its caches are freed on every stage); False if it had finished."""
        req = self.requests.get(rid)
        if req is None or req.future.done():
            return False
        self._end(req, RequestCancelledError(f"request {rid} was cancelled"))
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "model": self.source,
            "config": self.cfg.to_dict(),
            "stages": self.stage_info,
            "route": [f"meshpipe/{self.deployment}/stage-{i}/replica-0" for i in range(len(self.stages))],
            "router": vars(self.rc),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "active": sum(len(lane.seqs) for lane in self.lanes),
            "queued": len(self.waiting),
            "kv_reserved": self.kv_reserved,
            "tokens_generated": self.tokens_generated,
            "lanes": [len(lane.seqs) for lane in self.lanes],
        }

    async def set_hop_delay(self, stage: int, seconds: float) -> None:
        """Test hook: delays every message into `stage` by `seconds`."""
        await self.stages[stage].set_delay.remote(seconds)

    async def stage_stats(self) -> list[dict]:
        return list(await asyncio.gather(*[s.stats.remote() for s in self.stages]))

    async def shutdown(self) -> None:
        self._closed = True
        for req in list(self.requests.values()):
            if not req.future.done():
                self._end(req, DeploymentError(f"deployment {self.deployment!r} was shut down"))
        for t in self._tasks:
            t.cancel()

    # ---------- admission ----------

    def _new_request(self, prompt: Any, params: SamplingParams, timeout_s: float | None) -> Request:
        if self._closed:
            raise DeploymentError(f"deployment {self.deployment!r} is shut down")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, not {type(params).__name__}")
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidRequestError(f"timeout_s={timeout_s!r} must be positive")
        ids = encode_prompt(prompt, self.cfg, self.tokenizer)
        if params.seed is None:
            params = SamplingParams(**{**vars(params), "seed": random.getrandbits(31)})
        kv = min(len(ids) + params.max_new_tokens, self.cfg.max_seq_len)
        if kv > self.rc.max_kv_tokens:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs {kv} KV "
                f"tokens, more than the deployment's max_kv_tokens={self.rc.max_kv_tokens}"
            )
        rid = f"{self.deployment}-{next(self._ids)}"
        seq = SequenceState(rid, ids, params, frozenset(self.cfg.eos_ids), self.cfg.max_seq_len)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        return Request(rid, seq, kv, deadline, asyncio.get_running_loop().create_future())

    def _admit(self, reqs: list[Request]) -> None:
        self._ensure_started()
        active = sum(len(lane.seqs) for lane in self.lanes)
        limit = self.rc.max_active_sequences + self.rc.max_queued
        if active + len(self.waiting) + len(reqs) > limit:
            raise BackPressureError(
                f"pipeline {self.deployment!r} is full: {active} active and {len(self.waiting)} queued "
                f"requests, {len(reqs)} more would pass the limit of {limit} "
                f"(max_active_sequences={self.rc.max_active_sequences} + max_queued={self.rc.max_queued}); "
                "retry later"
            )
        for req in reqs:
            self.requests[req.rid] = req
            self.waiting.append(req)
        self._forget_finished()
        self._schedule()

    def _schedule(self) -> None:
        """Moves waiting requests into the least-loaded lanes while slots and KV budget allow."""
        while self.waiting:
            req = self.waiting[0]
            active = sum(len(lane.seqs) for lane in self.lanes)
            if active >= self.rc.max_active_sequences or self.kv_reserved + req.kv_tokens > self.rc.max_kv_tokens:
                return
            self.waiting.popleft()
            lane = min(self.lanes, key=lambda ln: len(ln.seqs))
            lane.seqs.append(req)
            req.lane = lane
            self.kv_reserved += req.kv_tokens
            lane.wake.set()

    def _ensure_started(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run_lane(lane)) for lane in self.lanes]
            self._tasks.append(loop.create_task(self._reap_timeouts()))

    # ---------- the step loop ----------

    async def _run_lane(self, lane: Lane) -> None:
        while not self._closed:
            if not lane.seqs:
                if lane.release:
                    ids, lane.release = lane.release, []
                    for stage in self.stages:
                        stage.free.remote(ids)
                lane.wake.clear()
                await lane.wake.wait()
                continue
            batch = list(lane.seqs)
            inputs = [r.seq.next_input() for r in batch]
            lane.step += 1
            env = Envelope(
                seq_ids=[r.rid for r in batch],
                starts=[r.seq.cached for r in batch],
                lengths=[len(x) for x in inputs],
                step=lane.step,
                tokens=[t for x in inputs for t in x],
                release=lane.release,
                push=self.rc.hop_mode == "push",
            )
            lane.release = []
            try:
                out = await self._send(env, [r.seq.params for r in batch])
            except Exception as e:  # noqa: BLE001 - any stage failure fails this step's requests
                err = self._stage_error(e)
                for r in batch:
                    if not r.future.done():
                        self._end(r, err)
                continue
            for r, token, lp in zip(batch, out.sampled, out.logprobs):
                if r.future.done():  # cancelled or timed out while the step was in flight
                    continue
                r.seq.add(token, lp, self.tokenizer)
                self.tokens_generated += 1
                r.changed.set()
                if r.seq.done:
                    self._release(r)
                    r.future.set_result(r.seq.completion(self.tokenizer))
            self._schedule()

    async def _send(self, env: Envelope, params: list[SamplingParams]) -> Envelope:
        """Runs one envelope down the stages; returns the last stage's envelope (sampled tokens)."""
        if env.push:
            env.params = params
            out: Any = await self.stages[0].forward.remote(env)
            while isinstance(out, self._ray.ObjectRef):  # each stage returned its successor's call
                out = await out
            return out
        ref: Any = env
        for stage in self.stages[:-1]:
            ref = stage.forward.remote(ref)
        return await self.stages[-1].forward.remote(ref, params)

    def _stage_error(self, e: Exception) -> MeshpipeError:
        cause = getattr(e, "cause", None)
        if isinstance(cause, MeshpipeError):
            return StageFailedError(f"a stage rejected the step: {cause}")
        actor = getattr(e, "actor_id", None)
        label = self._actor_label.get(actor if isinstance(actor, str) else getattr(actor, "hex", lambda: "")(), "a stage")
        log.warning("step failed at %s: %s", label, e)
        return StageFailedError(f"{label} of deployment {self.deployment!r} failed: {type(e).__name__}: {e}")

    def _release(self, req: Request) -> None:
        """Takes a request out of its lane and queues its caches to be freed on every stage."""
        lane = req.lane
        if lane is not None and req in lane.seqs:
            lane.seqs.remove(req)
            lane.release.append(req.rid)
            lane.wake.set()
            self.kv_reserved -= req.kv_tokens
        req.lane = None

    def _end(self, req: Request, err: Exception) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        if not req.future.done():
            req.future.set_exception(err)
            req.future.exception()  # mark retrieved: a caller may never ask
        req.changed.set()
        self._schedule()

    async def _reap_timeouts(self) -> None:
        while not self._closed:
            now = time.monotonic()
            for req in [r for r in self.requests.values() if r.deadline is not None and not r.future.done()]:
                if now > req.deadline:
                    self._end(req, RequestTimeoutError(
                        f"request {req.rid} timed out after {len(req.seq.generated)} tokens"))
            await asyncio.sleep(0.05)

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
