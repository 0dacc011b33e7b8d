"""The live status of a deployment, for the dashboard page and `GET /v1/pipeline/status`.

`StatusCollector` polls the deployment's router once a refresh period (describe, stats, every stage's own
stats, the autoscaler's decisions) and the training actors of the cluster, keeps the last minutes of
throughput, and turns what changed between two polls into events (`changes`, a pure function):
restarts, recoveries, replicas down or back, rings rerouted, autoscaler decisions. `PipelineStatus` is
the JSON a script reads (its schema is in the OpenAPI document).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from actors.detach import background

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # the page and the collector poll this often
WINDOW_S = 600.0  # throughput kept for the chart
EVENTS = 50  # events kept
IDLE_S = 60.0  # the collector stops polling when nobody asked for this long
_ERROR_NAME = re.compile(r"^(.*?\b[A-Z]\w*(?:Error|Exception))\b")


class ReplicaView(BaseModel):
    name: str = Field(description="the stage replica's actor name, meshpipe/<deployment>/stage-k/replica-r")
    stage: int
    replica: int
    node: str = Field(description="the Ray node id it runs on")
    device: str = Field(description="cpu, cuda:0, ...")
    alive: bool = Field(description="in the routes (False while down or draining)")
    busy: float = Field(description="fraction of the last refresh period it computed")
    queue: int = Field(description="messages sent to it and not answered")
    sequences: int = Field(description="sequences routed through it now")
    step_ms: float | None = Field(description="moving average of its step time")
    kv_blocks_used: int | None = None
    kv_blocks_free: int | None = None
    restarts: int = 0
    served: int = Field(0, description="sequences ever routed through it")
    on_route: bool = Field(description="on the route a new request would take now")


class Sample(BaseModel):
    t: float = Field(description="unix time")
    tokens_per_s: float
    active: int = Field(description="sequences decoding")
    queued: int = Field(description="requests waiting for a slot")


class Event(BaseModel):
    t: float = Field(description="unix time it was noticed")
    kind: str = Field(description="restart | down | back | recovery | replaced | reroute | autoscale")
    text: str


class TrainingRun(BaseModel):
    name: str = Field(description="the trainer's deployment name")
    stages: int
    steps: int
    loss: list[tuple[int, float]] = Field(description="(step, loss) of the last steps")
    tokens_per_s: float | None
    bubble: float | None = Field(description="the last step's measured idle fraction")


class PipelineStatus(BaseModel):
    deployment: str
    model: str
    updated: float = Field(description="unix time of the last poll")
    refresh_s: float
    stages: int
    route: list[str] = Field(description="the replicas a new request would visit now, in stage order")
    route_cost_ms: float | None
    mermaid: str = Field(description="the replica graph with that route (Mermaid)")
    replicas: list[ReplicaView]
    tokens_per_s: float = Field(description="over the last refresh period")
    tokens_generated: int = Field(description="since the deployment started")
    throughput: list[Sample] = Field(description="one sample a refresh period, the last minutes")
    events: list[Event] = Field(description="newest last")
    training: list[TrainingRun]


@dataclass
class Observed:
    """What one poll saw, reduced to what events are made of."""

    restarts: dict[str, int] = field(default_factory=dict)  # replica name -> restarts
    alive: dict[str, bool] = field(default_factory=dict)
    recoveries: int = 0  # recoveries so far
    last_recovery_s: float = 0.0
    replacements: int = 0
    rings_broken: int = 0
    last_ring_why: str = ""
    decisions: int = 0
    last_decision: dict[str, Any] = field(default_factory=dict)


def changes(prev: Observed | None, cur: Observed, now: float) -> list[Event]:
    """The events between two polls (none on the first)."""
    if prev is None:
        return []
    out = []
    for name, n in cur.restarts.items():
        if n > prev.restarts.get(name, n):
            out.append(Event(t=now, kind="restart", text=f"{name} restarted (restart {n})"))
    for name, up in cur.alive.items():
        was = prev.alive.get(name, up)
        if was != up:
            out.append(Event(t=now, kind="back" if up else "down",
                             text=f"{name} {'is back in the routes' if up else 'is down: routed around'}"))
    if cur.recoveries > prev.recoveries:
        out.append(Event(t=now, kind="recovery", text=f"{cur.recoveries - prev.recoveries} step(s) recovered, the "
                                                      f"last in {cur.last_recovery_s:.2f} s: no request lost"))
    if cur.replacements > prev.replacements:
        out.append(Event(t=now, kind="replaced", text="a replica was placed anew after its node was lost"))
    if cur.rings_broken > prev.rings_broken:
        out.append(Event(t=now, kind="reroute", text=f"a decode ring broke ({cur.last_ring_why}): its sequences "
                                                     "continue over another path"))
    if cur.decisions > prev.decisions:
        d = cur.last_decision
        why = f" ({d['reason']})" if d.get("reason") else ""
        out.append(Event(t=now, kind="autoscale", text=f"autoscaler: {int(d.get('delta', 0)):+d} replica(s) of "
                                                       f"stage {d.get('stage', '?')}{why}"))
    return out


def observe(stats: dict[str, Any], stages: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> Observed:
    router = stats
    reps = [r for stage in router.get("replicas", []) for r in stage]
    broken = router.get("rings_broken", [])
    recoveries = router.get("recoveries_s", [])
    return Observed(
        restarts={_name(s, reps): int(s.get("restarts", 0)) for s in stages if "down" not in s},
        alive={r["name"]: bool(r["alive"]) and not r.get("draining") for r in reps},
        recoveries=int(router.get("recoveries_total", 0)), last_recovery_s=recoveries[-1] if recoveries else 0.0,
        replacements=int(router.get("replacements", 0)), rings_broken=int(router.get("rings_broken_total", 0)),
        last_ring_why=ring_cause(str(broken[-1].get("why", ""))) if broken else "",
        decisions=int(decisions[-1].get("n", 0)) if decisions else 0,
        last_decision=decisions[-1] if decisions else {})


def ring_cause(why: str) -> str:
    """A ring break's cause as the page shows it: what broke and the error's type, never the error's text
    (a Ray or socket error names hosts and ports; `stats()` keeps the whole reason for the operator)."""
    m = _ERROR_NAME.match(why)
    return (m.group(1) if m else why.split(": ", 1)[0])[:120]


def _name(stage_stats: dict[str, Any], reps: list[dict[str, Any]]) -> str:
    suffix = f"stage-{stage_stats['stage']}/replica-{stage_stats['replica']}"
    return next((r["name"] for r in reps if r["name"].endswith(suffix)), suffix)


class StatusCollector:
    """Polls one deployment while someone watches; `status()` is the latest `PipelineStatus`."""

    def __init__(self, deployment: str, refresh_s: float = REFRESH_S, window_s: float = WINDOW_S) -> None:
        self.deployment, self.refresh_s = deployment, refresh_s
        self.samples: deque[Sample] = deque(maxlen=max(2, int(window_s / refresh_s)))
        self.events: deque[Event] = deque(maxlen=EVENTS)
        self._pipe: Any = None
        self._info: dict[str, Any] | None = None
        self._prev: Observed | None = None
        self._last: tuple[float, int, dict[str, float]] | None = None  # (time, tokens, busy_s by replica)
        self._status: PipelineStatus | None = None
        self._task: asyncio.Task | None = None
        self._asked = 0.0
        self._polls = 0

    async def status(self) -> PipelineStatus:
        """The latest status (polls now when there is none; keeps polling while asked)."""
        self._asked = time.monotonic()
        if self._task is None or self._task.done():
            await self.poll()
            self._task = background(self._loop())
        assert self._status is not None
        return self._status

    async def _loop(self) -> None:
        while time.monotonic() - self._asked < IDLE_S:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.poll()
            except Exception as e:  # noqa: BLE001 - keep the last status; the page shows its age
                log.warning("polling %r failed: %s", self.deployment, e)
                self._pipe = None

    async def poll(self) -> None:
        from actors.pipeline import Pipeline

        if self._pipe is None:
            self._pipe = Pipeline.connect(self.deployment)
            self._info = None
        pipe = self._pipe
        self._polls += 1
        if self._info is None or self._polls % 30 == 0:  # the route and replicas, re-read every 30 polls
            self._info = await pipe.acall("describe")
        stats, stages = await asyncio.gather(pipe.acall("stats"), pipe.acall("stage_stats"))
        decisions = await asyncio.to_thread(pipe.autoscaler_decisions)
        training = await asyncio.to_thread(training_runs)
        mermaid = await pipe.acall("routes_mermaid")
        self._update(self._info, stats, stages, decisions, training, mermaid, time.time())

    def _update(self, info: dict[str, Any], stats: dict[str, Any], stages: list[dict[str, Any]],
                decisions: list[dict[str, Any]], training: list[TrainingRun], mermaid: str, now: float) -> None:
        seen = observe(stats, stages, decisions)
        if self._prev is not None:  # a replica down in this poll keeps its last known restart count
            seen.restarts = {**self._prev.restarts, **seen.restarts}
        self.events.extend(changes(self._prev, seen, now))
        self._prev = seen
        reps = [r for st in stats["replicas"] for r in st]
        by_name = {_name(s, reps): s for s in stages}
        busy_now = {n: float(s.get("busy_s", 0.0)) for n, s in by_name.items() if "down" not in s}
        tokens = int(stats.get("tokens_generated", 0))
        rate, busy = 0.0, {}
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            rate = max(0.0, (tokens - self._last[1]) / dt)
            busy = {k: min(1.0, max(0.0, (v - self._last[2].get(k, v)) / dt)) for k, v in busy_now.items()}
        self._last = (now, tokens, busy_now)
        self.samples.append(Sample(t=now, tokens_per_s=rate, active=int(stats.get("active", 0)),
                                   queued=int(stats.get("queued", 0))))
        placed = {f"stage-{s['stage']}/replica-{s['replica']}": s for s in info["stages"]}
        route = list(info.get("route", []))
        replicas = []
        for stage in stats["replicas"]:
            for r in stage:
                own = by_name.get(r["name"], {})
                where = placed.get("/".join(r["name"].split("/")[-2:]), {})
                replicas.append(ReplicaView(
                    name=r["name"], stage=int(r["name"].split("stage-")[1].split("/")[0]),
                    replica=int(r["name"].rsplit("replica-", 1)[1]), node=str(where.get("node_id", "?")),
                    device=str(where.get("device", "?")), alive=bool(r["alive"]) and "down" not in own,
                    busy=round(busy.get(r["name"], 0.0), 3), queue=int(r.get("inflight", 0)),
                    sequences=int(r.get("sequences", 0)),
                    step_ms=None if own.get("step_ema_ms") is None else round(float(own["step_ema_ms"]), 3),
                    kv_blocks_used=own.get("kv_blocks_used"), kv_blocks_free=own.get("kv_blocks_free"),
                    restarts=int(own.get("restarts", 0)), served=int(r.get("served", 0)),
                    on_route=r["name"] in route))
        self._status = PipelineStatus(
            deployment=self.deployment, model=str(info.get("model", "")), updated=now, refresh_s=self.refresh_s,
            stages=len(stats["replicas"]), route=route, route_cost_ms=info.get("route_cost_ms"), mermaid=mermaid,
            replicas=replicas, tokens_per_s=round(rate, 3), tokens_generated=tokens,
            throughput=list(self.samples), events=list(self.events), training=training)


def training_runs() -> list[TrainingRun]:
    """Every trainer in the cluster (its copy 0's last stage keeps the step reports)."""
    import ray

    from actors.naming import NAMESPACE

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and "/copy-0/train-stage-" in a["name"]]
    last: dict[str, tuple[int, str]] = {}
    for n in names:
        dep, stage = n.split("/")[1], int(n.rsplit("-", 1)[1])
        if stage >= last.get(dep, (-1, ""))[0]:
            last[dep] = (stage, n)
    runs = []
    for dep, (stage, n) in sorted(last.items()):
        try:
            st = ray.get(ray.get_actor(n, namespace=NAMESPACE).stats.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a trainer shutting down is left out
            continue
        hist = st.get("history", [])
        tail = hist[-1] if hist else {}
        runs.append(TrainingRun(
            name=dep, stages=stage + 1, steps=int(tail.get("step", 0)),
            loss=[(int(h["step"]), float(h["loss"])) for h in hist[-300:]],
            tokens_per_s=round(tail["batch_tokens"] / tail["seconds"], 3) if tail.get("seconds") else None,
            bubble=tail.get("bubble")))
    return runs
