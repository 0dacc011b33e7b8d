"""The router: an async Ray actor that admits requests, batches them and drives every step.

Sequences are spread over *lanes*; each lane is one micro-batch that loops on its own, so while
lane 0 runs on stage 1, lane 1 can run on stage 0 (pipelining). A lane's step sends one
envelope down the stage chain as ObjectRefs (`stage_k.forward.remote(ref_{k-1})`), awaits the
sampled tokens from the last stage, and lets new sequences join at the next step
(iteration-level batching).

With several replicas per stage, each sequence gets a route (one replica per stage) when it
starts, the cheapest by the planner (topology/planner.py) with load as queue wait, and keeps it
while its KV cache lives there; a lane's step sends one envelope per distinct route, concurrently.
Every message brings back a per-hop trace (inbound wait, compute time) that feeds the costs, and
a background probe keeps idle replicas' inbound waits fresh.
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

import torch

from actors.codec import Header, LinkCodec
from actors.envelope import Envelope
from actors.gcs import actor_record, own_restarts
from actors.journal import RequestJournal, RequestRecord
from actors.metrics import RouterMetrics
from actors.links import LinkInfo, choose_link
from actors.replicas import Replica, ReplicaTable
from actors.errors import (
    BackPressureError,
    DeploymentError,
    RequestCancelledError,
    RequestTimeoutError,
    StageFailedError,
)
from models import Completion, InvalidRequestError, MeshpipeError, ModelConfig, SamplingParams, SequenceState
from models.generation import encode_prompt, stream_safe
from topology.errors import TopologyError
from topology.graph import Topology
from topology.failover import Health, choose_node, failover
from topology.planner import HostCosts, NoReplicaError, Route, RouteCache

log = logging.getLogger(__name__)


class RouteBrokenError(RuntimeError):
    """(Internal.) A replica on a step's route died while the step was in flight; recovery follows."""


@dataclass
class RouterConfig:
    max_active_sequences: int = 64  # sequences decoding at once
    max_queued: int = 256  # admitted requests waiting for a slot; beyond this -> BackPressureError
    max_kv_tokens: int = 262144  # sum of (prompt + max_new_tokens) over active sequences
    micro_batches: int = 1  # lanes: micro-batches in flight down the pipeline at once
    hop_mode: str = "router"  # "router": the router chains ObjectRefs; "push": stage k calls stage k+1
    finished_kept: int = 1024  # finished requests remembered for late `result`/`stream_next` calls
    load_knee: float = 8.0  # sequences on a replica at which its queue wait counts as one step time
    route_threshold: float = 0.1  # re-plan when a replica's cost moves by this fraction
    probe_interval_s: float = 1.0  # how often idle replicas' inbound waits are probed (0 = never)
    message_bytes: int = 4096  # typical activation message, for the topology's transfer costs
    topology_refresh_s: float = 30.0  # re-measure links between the stages' nodes (0 = never)
    codec: str = "auto"  # message codec: auto | none | fp16 | bf16 | int8 (actors/links.py)
    compress: str | None = None  # lossless zstd | lz4 on top (None: auto decides per link)
    encryption: str = "auto"  # auto (untrusted links) | always | never
    int8_block: int = 64  # elements per int8 scale
    restart_timeout_s: float = 60.0  # how long a step waits for a dead stage actor to restart
    replicate_every: int = 0  # copy new KV positions to a standby replica every this many steps (0 = never)
    checkpoint_interval_s: float = 1.0  # journal generated tokens this often (a restarted router resumes there)
    watch_interval_s: float = 0.05  # how often replicas' states are read from Ray while steps run (0 = never)


@dataclass
class Request:
    rid: str
    seq: SequenceState
    kv_tokens: int  # reserved KV budget: prompt + max_new_tokens
    deadline: float | None  # time.monotonic() after which it times out
    future: asyncio.Future
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lane: Lane | None = None
    route: Route | None = None  # the replicas holding its KV cache, chosen when it starts
    journaled: int = 0  # generated tokens in its journal record
    copies: dict[int, tuple[int, int]] = field(default_factory=dict)  # stage -> (standby replica, positions copied)


@dataclass
class Lane:
    index: int
    seqs: list[Request] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0


class RouterActor:
    def __init__(self, deployment: str, source: str | Path, config: dict, replicas: list[list[Any]],
                 replica_info: list[list[dict]], router_config: dict | None = None,
                 topology: dict | None = None, key: bytes | None = None, launcher: Any = None,
                 specs: list[Any] | None = None) -> None:
        import ray

        from models.loading import resolve_source
        from models.tokenizer import load_tokenizer

        self.deployment = deployment
        self.source = str(source)
        self.cfg = ModelConfig.from_dict(config)
        self.tokenizer = load_tokenizer(resolve_source(source))
        self.replica_info = replica_info
        self.launcher = launcher  # StageLauncher: places a replica anew after its node is lost
        self.specs = specs or []
        self.replacements = 0
        self.metrics = RouterMetrics(deployment)
        self._busy_since = time.monotonic()  # replicas' busy_ms count from here
        self.step_time: dict[int, tuple[float, float]] = {}  # stage -> emulated (s per step, s per token)
        self._busy_seen: dict[str, tuple[float, float]] = {}  # replica -> (when, its busy_s then)
        self.rc = RouterConfig(**(router_config or {}))
        self.table = ReplicaTable([
            [Replica(stage=k, replica=info["replica"], handle=h, host=info["node_id"],
                     name=f"meshpipe/{deployment}/stage-{k}/replica-{info['replica']}")
             for h, info in zip(handles, infos)]
            for k, (handles, infos) in enumerate(zip(replicas, replica_info))
        ], load_knee=self.rc.load_knee)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.topology: Topology | None = None if topology is None else Topology.from_dict(topology)
        self.measured = topology is None  # no topology given: measure it with probe actors
        self.costs = self._host_costs(self.topology)
        self.probes: dict[str, Any] = {}
        self.key = key
        self._links: dict[tuple[int, ...], list[LinkCodec]] = {}  # per route's replicas: how each hop encodes
        self._msg_ids = itertools.count(1)
        self.outbox: dict[int, Any] = {}  # msg id -> first message of a step in flight (for resends)
        self.retransmits = 0
        # per recovered step: (time.time() at its end, seconds in all, seconds of them failing over or
        # waiting for a restart; the rest rebuilt caches and re-ran the step)
        self.recoveries: list[tuple[float, float, float]] = []
        self._handle = ray.get_runtime_context().current_actor
        self._jobs: set[asyncio.Task] = set()  # background jobs (cache copies)
        self._copying: set[str] = set()  # sequences whose caches are being copied now
        self.copied_positions = 0  # KV positions copied to standbys (replicate_every)
        self.rebuilt_positions = 0  # KV positions recomputed by recoveries
        self._down: dict[tuple[int, int], asyncio.Event] = {}  # set while the watcher sees a replica dead
        self.routes = RouteCache(threshold=self.rc.route_threshold, min_change_ms=0.0)
        self._actor_label = {r.handle._actor_id.hex(): r.label for r in self.table}
        self.requests: OrderedDict[str, Request] = OrderedDict()
        self.waiting: deque[Request] = deque()
        self.lanes = [Lane(i) for i in range(self.rc.micro_batches)]
        self.kv_reserved = 0
        self.tokens_generated = 0
        self._ids = itertools.count()
        self.journal = RequestJournal(deployment)
        self.incarnation = own_restarts()  # > 0: Ray restarted this router; accepted requests are in the journal
        if self.incarnation == 0:
            self.journal.clear()  # a fresh deployment: records of an old one with this name are void
        self._resumed = self.incarnation == 0
        self.resumed = 0
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._ray = ray
        log.info("router for %r: %d stages, replicas per stage %s", deployment, len(replicas),
                 [len(r) for r in replicas])

    def _hosts(self) -> list[str]:
        return sorted({self.node_id, *(r.host for r in self.table)})

    def _host_costs(self, topo: Topology | None) -> HostCosts:
        """Transfer costs between the hosts of the router and the replicas (Ray node ids)."""
        hosts = self._hosts()
        if topo is None:
            return HostCosts.uniform(hosts, 0.0)
        missing = [h for h in hosts if h not in topo.graph]
        if missing:
            raise DeploymentError(f"the topology has no node for Ray node(s) {missing}: name nodes by Ray node id")
        return HostCosts.from_topology(topo, self.rc.message_bytes)

    async def _topology_loop(self) -> None:
        """Measures the links between the nodes hosting the router and the stages, in the background."""
        from actors.probe import measure_topology, start_probes

        while not self._closed:
            try:
                if not self.probes:
                    self.probes = start_probes(self._hosts(), f"meshpipe/{self.deployment}")
                topo = await asyncio.to_thread(measure_topology, self.probes)
                self.topology, self.costs = topo, self._host_costs(topo)
                self.routes.invalidate()
                self._links.clear()
            except Exception as e:  # noqa: BLE001 - keep the last costs; try again later
                log.warning("measuring the topology failed (keeping the last costs): %s", e)
            await asyncio.sleep(self.rc.topology_refresh_s)

    # ---------- public API (called through the actor handle) ----------

    async def submit(self, prompt: Any, params: SamplingParams, timeout_s: float | None = None) -> str:
        """Admits one request; returns its id. Raises InvalidRequestError or BackPressureError."""
        await self._resume()
        req = self._new_request(prompt, params, timeout_s)
        self._admit([req])
        return req.rid

    async def generate(self, prompts: list[Any], params: SamplingParams,
                       timeout_s: float | None = None) -> list[Completion]:
        """Admits all prompts at once (all or none) and returns their completions in order."""
        await self._resume()
        reqs = [self._new_request(p, params, timeout_s) for p in prompts]
        self._admit(reqs)
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
        reqs = [self._new_request(p, sp, timeout_s) for p, sp in zip(prompts, plist)]
        self._admit(reqs)
        return [r.rid for r in reqs]

    async def submit_chat(self, messages: list[dict], params: SamplingParams, timeout_s: float | None = None) -> str:
        """Applies the chat template and admits the request; returns its id."""
        return (await self.submit_many([self.chat_prompt(messages)], params, timeout_s))[0]

    async def chat(self, messages: list[dict], params: SamplingParams,
                   timeout_s: float | None = None) -> Completion:
        return (await self.generate([self.chat_prompt(messages)], params, timeout_s))[0]

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt the chat template makes of `messages` (ending where the assistant's answer begins)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so it cannot chat: pass token ids to generate")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    async def result(self, rid: str) -> Completion:
        await self._resume()
        return await self._await(self._get(rid))

    async def stream_next(self, rid: str, cursor: int, wait_s: float = 10.0) -> dict[str, Any]:
        """Tokens past `cursor` (waits up to `wait_s` for some); `done` with the completion at the end."""
        await self._resume()
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
        text = stream_safe(self.tokenizer.decode(req.seq.generated), req.seq.params.stop) if self.tokenizer else ""
        lps = req.seq.logprobs[cursor:] if req.seq.params.logprobs is not None else None
        return {"token_ids": req.seq.generated[cursor:], "text": text, "logprobs": lps, "done": False,
                "completion": None}

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
        route = self._plan()
        return {
            "deployment": self.deployment,
            "model": self.source,
            "config": self.cfg.to_dict(),
            "stages": [info for infos in self.replica_info for info in infos],
            "route": [r.name for r in self.table.on_route(route)],  # a new request's route now
            "route_cost_ms": route.cost_ms,
            "router_node": self.node_id,
            "links": [vars(lk) for lk in self.links_for(route)],  # how each hop of that route encodes
            "replicas": [[r.name for r in stage] for stage in self.table.by_stage],
            "probes": [f"meshpipe/{self.deployment}/probe-{n}" for n in self.probes],
            "topology": None if self.topology is None else self.topology.spec.model_dump(),
            "router": vars(self.rc),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "active": sum(len(lane.seqs) for lane in self.lanes),
            "queued": len(self.waiting),
            "kv_reserved": self.kv_reserved,
            "tokens_generated": self.tokens_generated,
            "retransmits": self.retransmits,
            "recoveries_s": [round(d, 3) for _, d, _ in self.recoveries],
            "recoveries": [(end, round(d, 3), round(w, 3)) for end, d, w in self.recoveries],
            "steps": sum(lane.step for lane in self.lanes),
            "incarnation": self.incarnation,
            "replacements": self.replacements,  # replicas placed anew after a node loss  # router restarts so far
            "resumed": self.resumed,  # requests re-admitted from the journal after a restart
            "copied_positions": self.copied_positions,
            "rebuilt_positions": self.rebuilt_positions,
            "lanes": [len(lane.seqs) for lane in self.lanes],
            "replicas": self.table.describe(),
        }

    def routes_mermaid(self) -> str:
        """The replicas as a layered graph, the route a new request would take drawn thick."""
        from topology.planner import route_to_mermaid

        return route_to_mermaid(self._plan(), self.table.states(), self.table.num_stages)

    async def set_hop_delay(self, stage: int, seconds: float, replica: int | None = None) -> None:
        """Test hook: delays every message into `stage` (one replica, or all) by `seconds`."""
        targets = [r for r in self.table.by_stage[stage] if replica is None or r.replica == replica]
        if not targets:
            raise InvalidRequestError(f"stage {stage} has no replica {replica}")
        await asyncio.gather(*[r.handle.set_delay.remote(seconds) for r in targets])

    async def inject_fault(self, stage: int, kind: str, count: int = 1, replica: int | None = None) -> None:
        """Test hook: corrupt or drop the next `count` messages that `stage` (one replica, or all) sends."""
        targets = [r for r in self.table.by_stage[stage] if replica is None or r.replica == replica]
        if not targets:
            raise InvalidRequestError(f"stage {stage} has no replica {replica}")
        await asyncio.gather(*[r.handle.inject_fault.remote(kind, count) for r in targets])

    # ---------- replicas added and removed at run time (the autoscaler) ----------

    async def set_step_time(self, stage: int, seconds: float, per_token: float = 0.0) -> None:
        """Test hook: every replica of `stage`, and any added later, takes `seconds` + `per_token` x tokens
        more per step."""
        self.step_time[stage] = (seconds, per_token)
        await asyncio.gather(*[r.handle.set_step_time.remote(seconds, per_token) for r in self.table.by_stage[stage]])

    async def stage_loads(self) -> list[dict[str, Any]]:
        """Per stage: live replicas, busy fraction since the last call, queue per replica, step ms."""
        now = time.monotonic()
        out = []
        for k, reps in enumerate(self.table.by_stage):
            live = [r for r in reps if r.alive and not r.draining and not r.gone]
            got = await asyncio.gather(*[asyncio.wait_for(r.handle.stats.remote(), 5) for r in live],
                                       return_exceptions=True)
            busy = []
            for r, st in zip(live, got):
                if isinstance(st, BaseException):
                    continue
                last_t, last_busy = self._busy_seen.get(r.name, (now, st["busy_s"]))
                busy.append((st["busy_s"] - last_busy) / (now - last_t) if now > last_t else 0.0)
                self._busy_seen[r.name] = (now, st["busy_s"])
            out.append({"stage": k, "replicas": len(live), "busy": sum(busy) / len(busy) if busy else 0.0,
                        "queue": sum(max(0, r.inflight - 1) for r in live) / max(1, len(live)),
                        "step_ms": sum(r.compute_ms or 0.0 for r in live) / max(1, len(live))})
        return out

    async def add_replica(self, stage: int) -> str:
        """Starts one more replica of `stage` (Ray finds it a GPU, or its autoscaler a node); routes use it
        once it is ready. Returns its name."""
        if self.launcher is None:
            raise DeploymentError("this deployment cannot start replicas (no launcher)")
        replica = 1 + max((r.replica for r in self.table.by_stage[stage]), default=-1)
        handle = self.launcher.launch(self.specs[stage], replica)
        info = await handle.ready.remote()
        if stage in self.step_time:
            await handle.set_step_time.remote(*self.step_time[stage])
        rep = Replica(stage=stage, replica=replica, handle=handle, host=info["node_id"],
                      name=f"meshpipe/{self.deployment}/stage-{stage}/replica-{replica}")
        self.table.add(rep)
        self.replica_info[stage].append(info)
        self._actor_label[handle._actor_id.hex()] = rep.label
        self._refresh_costs()
        log.warning("%s added (node %s)", rep.label, rep.host[:8])
        return rep.name

    async def drain_replica(self, stage: int, timeout_s: float = 60.0) -> str | None:
        """Removes the least-loaded replica of `stage` (never its last live one): no new sequences go
        to it, its own finish (or, after `timeout_s`, move with their caches rebuilt), then it is
        killed. Returns its name, or None if the stage has a single live replica."""
        live = [r for r in self.table.by_stage[stage] if r.alive and not r.draining and not r.gone]
        if len(live) < 2:
            return None
        rep = min(live, key=lambda r: (len(r.sequences), -r.replica))
        rep.draining, rep.alive = True, False
        self.routes.invalidate()
        end = time.monotonic() + timeout_s
        while rep.sequences and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if rep.sequences:  # move the rest: their next step fails over, caches rebuilt elsewhere
            self._down_event(rep).set()
            while rep.sequences:
                await asyncio.sleep(0.05)
        while rep.inflight:
            await asyncio.sleep(0.05)
        self.table.remove(rep)
        self.replica_info[stage] = [i for i in self.replica_info[stage] if i["replica"] != rep.replica]
        self._ray.kill(rep.handle, no_restart=True)
        self._refresh_costs()
        log.warning("%s drained and removed", rep.label)
        return rep.name

    def _refresh_costs(self) -> None:
        """Hosts changed (a replica added, removed or placed anew): transfer costs and routes follow."""
        try:
            self.costs = self._host_costs(self.topology)
        except (MeshpipeError, TopologyError):  # a host not yet in the measured topology: uniform for now
            self.costs = HostCosts.uniform(self._hosts(), 0.0)
        self.routes.invalidate()
        self._links.clear()

    async def stage_stats(self) -> list[dict]:
        reps = list(self.table)
        got = await asyncio.gather(*[asyncio.wait_for(r.handle.stats.remote(), 10) for r in reps],
                                   return_exceptions=True)
        return [x if not isinstance(x, BaseException) else
                {"stage": r.stage, "replica": r.replica, "down": f"{type(x).__name__}"} for r, x in zip(reps, got)]

    async def shutdown(self) -> None:
        self._closed = True
        self.journal.clear()
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
        rid = f"{self.deployment}-{next(self._ids)}" if not self.incarnation else \
            f"{self.deployment}-r{self.incarnation}-{next(self._ids)}"
        seq = SequenceState(rid, ids, params, frozenset(self.cfg.eos_ids), self.cfg.max_seq_len)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        return Request(rid, seq, kv, deadline, asyncio.get_running_loop().create_future())

    # ---------- the journal: surviving a router restart ----------

    def _record(self, req: Request, completion: Completion | None = None) -> RequestRecord:
        deadline = None if req.deadline is None else time.time() + (req.deadline - time.monotonic())
        return RequestRecord(req.rid, req.seq.prompt, req.seq.params, deadline, list(req.seq.generated),
                             list(req.seq.logprobs), completion)

    async def _resume(self) -> None:
        """After a restart: frees every stage's orphaned caches and re-admits the journal's requests."""
        if self._resumed:
            return
        self._resumed = True
        records = self.journal.load()
        freed = await asyncio.gather(*[r.handle.reset.remote() for r in self.table], return_exceptions=True)
        log.warning("router restarted (incarnation %d): %d requests from the journal; freed %d orphaned "
                    "caches on the stages", self.incarnation, len(records),
                    sum(x for x in freed if isinstance(x, int)))
        loop = asyncio.get_running_loop()
        resumed = []
        for rec in records:
            seq = SequenceState(rec.rid, rec.prompt, rec.params, frozenset(self.cfg.eos_ids), self.cfg.max_seq_len,
                                generated=list(rec.generated), logprobs=list(rec.logprobs))
            kv = min(len(rec.prompt) + rec.params.max_new_tokens, self.cfg.max_seq_len)
            deadline = None if rec.deadline_unix is None else time.monotonic() + (rec.deadline_unix - time.time())
            req = Request(rec.rid, seq, kv, deadline, loop.create_future(), journaled=len(rec.generated))
            self.requests[rec.rid] = req
            if rec.completion is not None:
                req.future.set_result(rec.completion)
            else:
                resumed.append(req)
        self._ensure_started()
        self.resumed = len(resumed)
        self.waiting.extend(sorted(resumed, key=lambda r: r.rid))
        self._schedule()

    async def _checkpoint_loop(self) -> None:
        """Every second, journals the tokens of requests that generated some since the last time."""
        while not self._closed:
            await asyncio.sleep(self.rc.checkpoint_interval_s)
            for lane in self.lanes:
                for req in lane.seqs:
                    if len(req.seq.generated) != req.journaled and not req.future.done():
                        self.journal.put(self._record(req))
                        req.journaled = len(req.seq.generated)

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
            self.journal.put(self._record(req))
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
            try:
                route = self._plan()
            except NoReplicaError:
                lost = [k for k, reps in enumerate(self.table.by_stage) if all(r.gone for r in reps)]
                if not lost:
                    return  # every replica of a stage is down for now: wait for the probe to readmit one
                doomed = list(self.waiting)
                self.waiting.clear()
                for r in doomed:
                    self._end(r, StageFailedError(self._all_gone_message(lost[0])))
                return
            self.waiting.popleft()
            lane = min(self.lanes, key=lambda ln: len(ln.seqs))
            lane.seqs.append(req)
            req.lane = lane
            req.route = route
            self.table.assign(req.route, req.rid)
            self.kv_reserved += req.kv_tokens
            lane.wake.set()

    def _ensure_started(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run_lane(lane)) for lane in self.lanes]
            self._tasks.append(loop.create_task(self._reap_timeouts()))
            if self.rc.probe_interval_s > 0:
                self._tasks.append(loop.create_task(self._probe_loop()))
            if self.rc.checkpoint_interval_s > 0:
                self._tasks.append(loop.create_task(self._checkpoint_loop()))
            if self.rc.watch_interval_s > 0:
                self._tasks.append(loop.create_task(self._watch_loop()))
            if self.measured and self.rc.topology_refresh_s > 0 and len(self._hosts()) > 1:
                self._tasks.append(loop.create_task(self._topology_loop()))

    def _plan(self) -> Route:
        """The cheapest route for a new sequence now (cached until costs move)."""
        return self.routes.get(self.table.states(), self.table.num_stages, self.costs, self.node_id)

    # ---------- the step loop ----------

    async def _run_lane(self, lane: Lane) -> None:
        while not self._closed:
            if not lane.seqs:
                self._flush_releases()
                lane.wake.clear()
                await lane.wake.wait()
                continue
            batch = list(lane.seqs)
            lane.step += 1
            groups: dict[tuple[int, ...], list[Request]] = {}  # by replicas: a route's cost moves with load
            for r in batch:
                groups.setdefault(r.route.replicas, []).append(r)
            tokens = [sum(len(r.seq.next_input()) for r in reqs) for reqs in groups.values()]
            outs = await asyncio.gather(*[self._step(lane, reqs[0].route, reqs) for reqs in groups.values()],
                                        return_exceptions=True)
            for reqs, out, n_tokens in zip(groups.values(), outs, tokens):
                if isinstance(out, BaseException) and self._recoverable(out):
                    try:
                        out = await self._recover(lane, reqs, out)
                    except Exception as e:  # noqa: BLE001 - recovery failed: fail these requests below
                        out = e
                if isinstance(out, BaseException):  # any stage failure fails these requests
                    err = self._stage_error(out)
                    for r in reqs:
                        if not r.future.done():
                            self._end(r, err)
                    continue
                self.table.observe_trace(out.trace, n_tokens)
                self.metrics.step(len(reqs), out.trace, out.retransmits)
                if self.rc.replicate_every and lane.step % self.rc.replicate_every == 0:
                    self._spawn(self._replicate(reqs, reqs[0].route))
                for r, token, lp in zip(reqs, out.sampled, out.logprobs):
                    if r.future.done():  # cancelled or timed out while the step was in flight
                        continue
                    r.seq.add(token, lp, self.tokenizer)
                    self.tokens_generated += 1
                    r.changed.set()
                    if r.seq.done:
                        completion = r.seq.completion(self.tokenizer)
                        completion.route = [rep.name for rep in self.table.on_route(r.route)]
                        self._release(r)
                        self.journal.put(self._record(r, completion))  # a late `result` after a restart finds it
                        r.future.set_result(completion)
                        self.metrics.finished(completion.finish_reason)
            self._schedule()

    async def _step(self, lane: Lane, route: Route, reqs: list[Request], kind: str = "step") -> Envelope:
        inputs = [r.seq.next_input() for r in reqs]
        msg_id = next(self._msg_ids)
        header = Header(kind=kind, step=lane.step, msg_id=msg_id, attempt=0, sender="router",
                        seq_ids=[r.rid for r in reqs], starts=[r.seq.cached for r in reqs],
                        lengths=[len(x) for x in inputs], release=self.table.take_release(route))
        links = self.links_for(route)
        tokens = torch.tensor([t for x in inputs for t in x], dtype=torch.long)
        env = Envelope.seal(header, tokens, links[0], self.key, reply_to=self._handle, links=links)
        self.outbox[msg_id] = env.wire
        try:
            return await self._send(env, [r.seq.params for r in reqs], route)
        finally:
            del self.outbox[msg_id]

    async def _send(self, env: Envelope, params: list[SamplingParams], route: Route) -> Envelope:
        """Runs one envelope down the route's replicas; returns the last stage's envelope.

        Gives up as soon as the watcher sees a replica on the route die (RouteBrokenError), instead
        of waiting for Ray to fail the call once the actor has restarted (~2 s).
        """
        reps = self.table.on_route(route)
        for r in reps:
            r.inflight += 1
        step = asyncio.ensure_future(self._chain(env, params, [r.handle for r in reps]))
        step.add_done_callback(lambda _: self._landed(reps))
        watchers = [asyncio.ensure_future(self._down_event(r).wait()) for r in reps]
        try:
            await asyncio.wait([step, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in watchers:
                w.cancel()
        if step.done():
            return step.result()
        step.cancel()  # stops waiting only: the message dies at the dead replica; later stages' calls fail
        # on their argument. Stages run calls out of order, so those do not hold up other routes' steps.
        down = [r.label for r in reps if self._down_event(r).is_set()]
        raise RouteBrokenError(f"{', '.join(down)} died during the step")

    @staticmethod
    def _landed(reps: list[Replica]) -> None:
        for r in reps:
            r.inflight -= 1

    def _down_event(self, rep: Replica) -> asyncio.Event:
        key = (rep.stage, rep.replica)
        if key not in self._down:
            self._down[key] = asyncio.Event()
        return self._down[key]

    def _actor_state(self, rep: Replica) -> str:
        return actor_record(rep.handle)[0]

    async def _watch_loop(self) -> None:
        """While steps are in flight, reads every replica's state from the GCS every `watch_interval_s`.

        Ray marks a killed actor RESTARTING (or DEAD) within milliseconds, while a call to it fails
        only once it is back (~2 s): watching lets a replica's death fail its steps at once.
        """
        while not self._closed:
            await asyncio.sleep(self.rc.watch_interval_s)
            if not any(lane.seqs for lane in self.lanes):
                continue
            for rep in self.table:
                if rep.gone:
                    continue
                st, restarts = actor_record(rep.handle)
                event = self._down_event(rep)
                if st in ("RESTARTING", "DEAD") and not event.is_set():
                    log.warning("%s is %s", rep.label, st.lower())
                    event.set()
                elif st == "ALIVE":
                    event.clear()
                    if not rep.alive and not rep.draining and rep.restarts_seen < restarts:
                        rep.restarts_seen = restarts
                        rep.alive = True  # Ray restarted it (empty caches): usable at once, no backoff
                        self.routes.invalidate()
                        log.warning("%s restarted: back in the routes", rep.label)
                        self._schedule()

    async def _chain(self, env: Envelope, params: list[SamplingParams], handles: list[Any]) -> Envelope:
        env.sent_at = time.time()
        if self.rc.hop_mode == "push":
            env.params = params
            env.hops = handles[1:]
            out: Any = await handles[0].forward.remote(env)
            while isinstance(out, self._ray.ObjectRef):  # each stage returned its successor's call
                out = await out
        else:
            ref: Any = env
            for h in handles[:-1]:
                ref = h.forward.remote(ref)
            out = await handles[-1].forward.remote(ref, params)
        self.retransmits += out.retransmits
        return out

    # ---------- recovery from a stage actor that died (and restarts) ----------

    def _recoverable(self, e: BaseException) -> bool:
        """A dead or restarting stage actor, or one that came back without its cache."""
        from actors.codec import OutOfOrderError

        exc = self._ray.exceptions
        return isinstance(e, (exc.RayActorError, exc.ActorUnschedulableError, RouteBrokenError)) or isinstance(
            getattr(e, "cause", None), OutOfOrderError)

    async def _recover(self, lane: Lane, reqs: list[Request], err: BaseException) -> Envelope:
        """Fails over the route's dead replicas, rebuilds lost caches (batched), re-runs the failed step.

        `topology.failover` decides: a failed stage moves to a live replica of the same stage (the
        others keep theirs), or is waited for while Ray restarts it, or fails the step when none
        is left. A stage that lost positions gets them back as one "rebuild" message: token ids
        for stage 0, stage k-1's output history otherwise. Surviving stages are not touched; the
        failed step is re-sent as a "rebuild" so stages that had applied it rewind instead of
        appending twice. Sampling is seeded per position, so the tokens are those of a clean run.
        """
        t0 = time.monotonic()
        deadline = t0 + self.rc.restart_timeout_s
        log.warning("step %d of %d sequences failed (%s): recovering route %s", lane.step, len(reqs),
                    type(err).__name__, " -> ".join(r.label for r in self.table.on_route(reqs[0].route)))
        waited = 0.0
        while True:
            t1 = time.monotonic()
            route = await self._failover(reqs, deadline)
            waited += time.monotonic() - t1
            try:
                await self._rebuild(lane.step, reqs, route)
                out = await self._step(lane, route, reqs, kind="rebuild")
                break
            except Exception as e:  # noqa: BLE001 - another replica died meanwhile: fail over again
                if not self._recoverable(e) or time.monotonic() >= deadline:
                    raise
                log.warning("recovery of step %d interrupted (%s): again", lane.step, type(e).__name__)
        self.recoveries.append((time.time(), time.monotonic() - t0, waited))
        self.metrics.recovered(time.monotonic() - t0)
        return out

    def _standbys(self, reqs: list[Request]) -> dict[int, int]:
        """Per stage, the standby replica holding copies for most of these sequences."""
        out = {}
        for k in range(self.table.num_stages):
            votes = [r.copies[k][0] for r in reqs if k in r.copies]
            if votes:
                out[k] = max(set(votes), key=votes.count)
        return out

    async def _failover(self, reqs: list[Request], deadline: float) -> Route:
        """Acts on `topology.failover` until every replica on the sequences' route answers; returns it."""
        route = reqs[0].route
        while True:
            reps = self.table.on_route(route)
            health = await asyncio.gather(*[self._health(rep) for rep in reps])
            if all(h == Health.UP for h in health):
                return route
            for rep, h in zip(reps, health):
                rep.gone = rep.gone or h == Health.GONE
            decision = failover(route, health, self.table.states(), self.table.num_stages, self.costs,
                                self.node_id, prefer=self._standbys(reqs))
            lost = [k for k in decision.gone + decision.wait
                    if self.launcher is not None and not self._node_alive(reps[k].host)]
            if lost:  # its node is gone: start it anew on a node with room
                for k in lost:
                    await self._replace(reps[k], [r.host for r in reps if r is not reps[k]], deadline)
                continue
            if decision.gone:
                raise StageFailedError(self._all_gone_message(decision.gone[0]))
            if decision.moved:
                self.metrics.rerouted(len(reqs))
                self._ban([reps[k] for k in decision.moved])
                for r in reqs:
                    self.table.move(route, decision.route, r.rid)
                    r.route = decision.route
                    for k in decision.moved:  # the standby (if it was one) is now the primary
                        if r.copies.get(k, (None,))[0] == decision.route.replicas[k]:
                            del r.copies[k]
                route = decision.route
                log.warning("%d sequences moved to %s", len(reqs),
                            " -> ".join(r.label for r in self.table.on_route(route)))
                continue  # check the new route's replicas too
            for k in decision.wait:
                await self._wait_alive(reps[k], deadline)

    def _node_alive(self, node_id: str) -> bool:
        return any(n["NodeID"] == node_id and n.get("Alive") for n in self._ray.nodes())

    async def _replace(self, rep: Replica, near: list[str], deadline: float) -> None:
        """Places a lost replica anew (`topology.failover.choose_node`) with hard node affinity; its caches
        are rebuilt by the recovery that follows."""
        from ray._private.state import state
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = {n["NodeID"] for n in self._ray.nodes() if n.get("Alive")}
        free = {n: res for n, res in state.available_resources_per_node().items() if n in alive}
        need = {"GPU": float(self.launcher.resources.get("num_gpus", 0) or 0),
                "CPU": float(self.launcher.resources.get("num_cpus", 0) or 0)}
        node = choose_node(free, {k: v for k, v in need.items() if v}, exclude={rep.host}, near=near)
        if node is None:
            raise StageFailedError(f"{rep.label} of deployment {self.deployment!r} lost its node and no other node "
                                   f"has {need} free: add a node (or let the cluster autoscaler add one)")
        log.warning("%s lost its node %s: placing it anew on %s", rep.label, rep.host[:8], node[:8])
        try:
            self._ray.kill(rep.handle, no_restart=True)  # frees its name if Ray still holds it
        except Exception:  # noqa: BLE001 - already dead
            pass
        spec = self.specs[rep.stage]
        while True:
            try:
                handle = self.launcher.launch(spec, rep.replica, {
                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)})
                break
            except ValueError:  # the old actor's name is released a moment after it is dead
                if time.monotonic() > deadline:
                    raise StageFailedError(f"{rep.label}: its name stayed taken; cannot place it anew") from None
                await asyncio.sleep(0.1)
        info = await asyncio.wait_for(handle.ready.remote(), max(1.0, deadline - time.monotonic()))
        self._actor_label.pop(rep.handle._actor_id.hex(), None)
        rep.handle, rep.host, rep.gone, rep.alive = handle, info["node_id"], False, True
        rep.restarts_seen, rep.compute_ms = 0, None
        self._actor_label[handle._actor_id.hex()] = rep.label
        self._down.pop((rep.stage, rep.replica), None)
        self.replica_info[rep.stage] = [info if i["replica"] == rep.replica else i for i in self.replica_info[rep.stage]]
        self._refresh_costs()
        self.replacements += 1

    def _spawn(self, coro: Any) -> None:
        """Runs a background job; its failure is logged, never raised into a step."""
        task = asyncio.ensure_future(coro)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background job failed: %s", task.exception())

    async def _replicate(self, reqs: list[Request], route: Route) -> None:
        """Copies the sequences' new KV positions on every stage of `route` to a standby replica there.

        The standby is the least-loaded other live replica of the stage; a sequence's copy keeps
        its standby, so each copy sends only the positions since the last one. On failover the
        sequences move to their standby (`failover(prefer=...)`) and only the tail is rebuilt.
        """
        reqs = [r for r in reqs if r.rid not in self._copying and not r.future.done()]
        if not reqs:
            return
        self._copying.update(r.rid for r in reqs)
        try:
            for k, rep in enumerate(self.table.on_route(route)):
                others = [o for o in self.table.by_stage[k] if o is not rep and o.alive]
                if not others:
                    continue
                chosen = {r.copies[k][0] for r in reqs if k in r.copies}
                standby = next((o for o in others if o.replica in chosen), None) or \
                    min(others, key=lambda o: (len(o.sequences), o.replica))
                starts = [r.copies[k][1] if r.copies.get(k, (None,))[0] == standby.replica else 0 for r in reqs]
                for r in reqs:
                    standby.keep(r.rid)
                refs, ends = await rep.handle.replicate.remote(standby.handle, [r.rid for r in reqs], starts)
                await refs[0]
                for r, end in zip(reqs, ends):
                    old = r.copies.get(k)
                    if old and old[0] != standby.replica:
                        self.table.get(k, old[0]).release.append(r.rid)
                    r.copies[k] = (standby.replica, end)
                self.copied_positions += sum(e - s for e, s in zip(ends, starts))
        finally:
            self._copying.difference_update(r.rid for r in reqs)

    async def _rebuild(self, step: int, reqs: list[Request], route: Route) -> None:
        """Gives every replica on `route` the cached positions it lacks, stage by stage, batched."""
        reps = self.table.on_route(route)
        ids = [r.rid for r in reqs]
        needed = [r.seq.cached for r in reqs]
        links = self.links_for(route)
        for k, rep in enumerate(reps):
            have = await rep.handle.have.remote(ids)
            todo = [i for i, h in enumerate(have) if h < needed[i]]
            if not todo:
                continue
            header = Header(kind="rebuild", step=step, msg_id=next(self._msg_ids), attempt=0, sender="router",
                            seq_ids=[ids[i] for i in todo], starts=[have[i] for i in todo],
                            lengths=[needed[i] - have[i] for i in todo], release=[])
            if k == 0:
                toks = [t for i in todo for t in (reqs[i].seq.prompt + reqs[i].seq.generated)[have[i]:needed[i]]]
                env: Any = Envelope.seal(header, torch.tensor(toks, dtype=torch.long), links[0], self.key, links=links)
            else:
                env = reps[k - 1].handle.replay.remote(header, links)
            await rep.handle.forward.remote(env, [reqs[i].seq.params for i in todo])
            self.rebuilt_positions += sum(header.lengths)
            log.warning("rebuilt %d positions of %d sequences on %s", sum(header.lengths), len(todo), rep.label)

    def _all_gone_message(self, stage: int) -> str:
        names = ", ".join(r.label for r in self.table.by_stage[stage])
        return (f"stage {stage} of deployment {self.deployment!r} has no replica left ({names} are gone for "
                "good: restarts used up or killed): redeploy, or deploy with more replicas or max_restarts")

    async def _health(self, rep: Replica, timeout_s: float = 1.0) -> Health:
        """Ray's record of the actor (a busy replica is not a dead one); a ping only if that is unreadable."""
        if rep.gone:
            return Health.GONE
        st = self._actor_state(rep)
        if st == "UNKNOWN":
            try:
                await asyncio.wait_for(rep.handle.__ray_ready__.remote(), timeout_s)
                st = "ALIVE"
            except self._ray.exceptions.ActorDiedError:
                st = "DEAD"
            except (self._ray.exceptions.RayActorError, asyncio.TimeoutError):
                st = "RESTARTING"
        if st == "ALIVE":
            self._down_event(rep).clear()
            return Health.UP
        return Health.GONE if st == "DEAD" else Health.DOWN

    def _ban(self, down: list[Replica]) -> None:
        """Takes replicas out of the routes with backoff (2 s, doubling to 60 s); gone ones for good."""
        now = time.monotonic()
        for rep in down:
            if not rep.alive:  # banned already (another group's recovery of the same failure)
                continue
            rep.alive = False
            rep.ban_s = min(60.0, rep.ban_s * 2) if rep.ban_s else 2.0
            rep.banned_until = now + rep.ban_s
            log.warning("%s is %s: its sequences move to other replicas", rep.label,
                        "gone" if rep.gone else f"down, banned for {rep.ban_s:.0f} s")
        self.routes.invalidate()

    async def _wait_alive(self, rep: Replica, deadline: float) -> None:
        """Waits for a restarting actor; StageFailedError at `deadline`; marks it gone if Ray gives it up."""
        while True:
            health = await self._health(rep)
            if health == Health.UP:
                return
            if health == Health.GONE:  # dead for good: the failover loop decides again
                rep.gone = True
                return
            if self.launcher is not None and not self._node_alive(rep.host):  # the failover loop re-places it
                return
            if time.monotonic() >= deadline:
                raise StageFailedError(
                    f"{rep.label} of deployment {self.deployment!r} did not come back within "
                    f"{self.rc.restart_timeout_s:g} s: its node may be lost or the cluster has no room to "
                    "restart it")
            await asyncio.sleep(0.05)

    def resend(self, msg_id: int) -> Any:
        """A stage asks again for a step's first message that failed its checksum."""
        if msg_id not in self.outbox:
            raise InvalidRequestError(f"message {msg_id} is not in flight any more")
        return self.outbox[msg_id]

    def links_for(self, route: Route) -> list[LinkCodec]:
        """How each hop of `route` encodes: links[k] is the message into stage k."""
        if route.replicas not in self._links:
            hosts = [self.node_id, *route.hosts]
            self._links[route.replicas] = [
                choose_link(self._link_info(a, b), self.rc.codec, self.rc.compress, self.rc.encryption,
                            self.rc.message_bytes, self.rc.int8_block)
                for a, b in zip(hosts, hosts[1:])
            ]
        return self._links[route.replicas]

    def _link_info(self, a: str, b: str) -> LinkInfo:
        if a == b or self.topology is None or a not in self.topology.graph or b not in self.topology.graph:
            return LinkInfo(same_host=a == b, bandwidth_gbps=None)
        try:
            path, _ = self.topology.route(a, b, self.rc.message_bytes)
        except TopologyError:
            return LinkInfo(same_host=False, bandwidth_gbps=None)
        edges = [self.topology.graph.edges[u, v] for u, v in zip(path, path[1:])]
        bws = [e["bandwidth_gbps"] for e in edges if e["bandwidth_gbps"]]
        return LinkInfo(same_host=False, bandwidth_gbps=min(bws) if bws else None,
                        trusted=all(e.get("trusted", True) for e in edges))

    def _flush_releases(self) -> None:
        """Frees finished sequences' caches on replicas no message is going to soon."""
        for rep in self.table:
            if rep.release:
                ids, rep.release = rep.release, []
                rep.handle.free.remote(ids)

    async def _probe_loop(self) -> None:
        """Keeps every replica's inbound wait fresh, also for replicas no route uses now."""
        while not self._closed:
            await asyncio.sleep(self.rc.probe_interval_s)
            now = time.monotonic()
            self._export_loads(now)
            reps = [r for r in self.table if not r.gone and not r.draining
                    and (r.alive or now >= r.banned_until)]  # banned ones after their backoff
            sent = time.time()
            results = await asyncio.gather(*[asyncio.wait_for(r.handle.probe.remote(sent), 5.0) for r in reps],
                                           return_exceptions=True)
            for rep, ms in zip(reps, results):
                if isinstance(ms, self._ray.exceptions.ActorDiedError):
                    rep.gone, rep.alive = True, False
                    self.routes.invalidate()
                    log.warning("%s is gone for good (restarts used up or killed)", rep.label)
                    self._schedule()  # requests waiting for this stage may have to fail now
                    continue
                if isinstance(ms, BaseException):
                    if not rep.alive:  # still down: back off further
                        rep.ban_s = min(60.0, rep.ban_s * 2)
                        rep.banned_until = now + rep.ban_s
                    continue
                rep.observe(inbound_ms=ms)
                if not rep.alive:
                    rep.alive = True  # answers again (restarted): new sequences may use it
                    self.routes.invalidate()
                    log.warning("%s answers again: back in the routes", rep.label)
                    self._schedule()

    def _export_loads(self, now: float) -> None:
        """Queue length per replica and pipeline efficiency (mean busy fraction from the traces) as metrics."""
        live = [r for r in self.table if r.alive and not r.gone]
        self.metrics.load(sum(len(ln.seqs) for ln in self.lanes), len(self.waiting))
        self.metrics.queues({(r.stage, r.replica): max(0, r.inflight - 1) for r in live})
        period_ms = (now - self._busy_since) * 1e3
        if period_ms > 0 and live:
            busy = [min(1.0, r.busy_ms / period_ms) for r in live]
            self.metrics.efficiency.set(sum(busy) / len(busy), self.metrics.tags)
        for r in self.table:
            r.busy_ms = 0.0
        self._busy_since = now

    def _stage_error(self, e: Exception) -> MeshpipeError:
        if isinstance(e, StageFailedError):  # recovery's own verdict, already naming the stage
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, MeshpipeError):
            return StageFailedError(f"a stage rejected the step: {cause}")
        actor = getattr(e, "actor_id", None)
        label = self._actor_label.get(actor if isinstance(actor, str) else getattr(actor, "hex", lambda: "")(), "a stage")
        log.warning("step failed at %s: %s", label, e)
        return StageFailedError(f"{label} of deployment {self.deployment!r} failed: {type(e).__name__}: {e}")

    def _release(self, req: Request) -> None:
        """Takes a request out of its lane and queues its caches to be freed on its route."""
        lane = req.lane
        if lane is not None and req in lane.seqs:
            lane.seqs.remove(req)
            lane.wake.set()
            self.kv_reserved -= req.kv_tokens
            if req.route is not None:
                self.table.finish(req.route, req.rid)
            for stage, (replica, _) in req.copies.items():  # the standby's copies go too
                self.table.get(stage, replica).release.append(req.rid)
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
            self.journal.drop(rid)
