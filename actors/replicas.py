"""The router's view of the stage replicas: where they run, what they cost, who they serve.

Pure bookkeeping (no Ray calls), unit-tested without Ray: the router feeds it measurements (the
per-hop trace each step brings back, probe round trips) and asks it for the planner's input.
Load enters the cost as a queue wait, so new sequences spread over replicas instead of piling
on the cheapest one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from topology.costs import LOAD_KNEE, ema, queue_ms, step_ms
from topology.planner import ReplicaState, Route

log = logging.getLogger(__name__)

PREFILL_MIN_TOKENS = 32  # a step this large prices prompt tokens (a decode step's cost is mostly fixed)


@dataclass
class Replica:
    stage: int  # stage index
    replica: int  # replica id within its stage
    handle: Any  # the Ray actor handle (opaque here)
    host: str  # the Ray node id it runs on
    name: str  # its actor name, meshpipe/<deployment>/stage-k/replica-r
    compute_ms: float | None = None  # moving average of its step time (None: not measured yet)
    token_ms: float | None = None  # moving average of step time per token (compute-bound work grows with batch)
    prefill_ms: float | None = None  # ... of steps with >= PREFILL_MIN_TOKENS tokens: a prompt token's own cost
    inbound_ms: float = 0.0  # moving average of the wait between a message's send and its start
    sequences: set[str] = field(default_factory=set)  # active sequences routed through it
    served: int = 0  # sequences ever routed through it
    release: list[str] = field(default_factory=list)  # finished sequences to free here
    alive: bool = True  # False while banned (down); the planner skips it
    banned_until: float = 0.0  # time.monotonic() after which the probe loop tries it again
    ban_s: float = 0.0  # current backoff (doubles on each ban, up to 60 s)
    restarts_seen: int = 0  # Ray restarts of it the router has taken back into the routes
    draining: bool = False  # being removed: no new sequences; its own finish (or move) first
    evicting: bool = False  # draining past its timeout: counted down, so its sequences move elsewhere
    inflight: int = 0  # messages sent to it and not answered yet (its queue, as the router sees it)
    busy_ms: float = 0.0  # compute ms of its steps since the router last exported metrics
    gone: bool = False  # dead for good (Ray will not restart it): never probed or routed again

    @property
    def label(self) -> str:
        return f"stage-{self.stage}/replica-{self.replica}"

    def keep(self, seq_id: str) -> None:
        """The sequence is (again) served or copied here: a pending free of it must not go out."""
        if seq_id in self.release:
            self.release.remove(seq_id)

    def free_later(self, seq_ids: list[str]) -> None:
        """Queues frees of these sequences here, but of none it serves now or has queued already."""
        self.release += [sid for sid in seq_ids if sid not in self.sequences and sid not in self.release]

    def observe(self, inbound_ms: float | None = None, compute_ms: float | None = None) -> None:
        if inbound_ms is not None:
            self.inbound_ms = max(0.0, ema(self.inbound_ms, inbound_ms))
        if compute_ms is not None:
            self.compute_ms = ema(self.compute_ms, compute_ms)


class ReplicaTable:
    """All replicas of a deployment, by stage."""

    def __init__(self, replicas: list[list[Replica]], load_knee: float = LOAD_KNEE) -> None:
        self.by_stage = replicas  # [stage][i]
        self.load_knee = load_knee  # sequences at which a replica's queue wait equals its step time
        self._index = {(r.stage, r.replica): r for rs in replicas for r in rs}
        self.in_flight: Counter[str] = Counter()  # sequences in messages on their way: not freed meanwhile

    @property
    def num_stages(self) -> int:
        return len(self.by_stage)

    def __iter__(self):  # noqa: ANN204
        return iter(self._index.values())

    def get(self, stage: int, replica: int) -> Replica:
        return self._index[(stage, replica)]

    def find(self, stage: int, replica: int) -> Replica | None:
        """The replica, or None once it was drained and removed (a request's standby copy may name it)."""
        return self._index.get((stage, replica))

    def add(self, rep: Replica) -> None:
        self.by_stage[rep.stage].append(rep)
        self._index[(rep.stage, rep.replica)] = rep

    def remove(self, rep: Replica) -> None:
        self.by_stage[rep.stage].remove(rep)
        self._index.pop((rep.stage, rep.replica), None)

    def on_route(self, route: Route) -> list[Replica]:
        return [self._index[(s, r)] for s, r in enumerate(route.replicas)]

    def states(self) -> list[ReplicaState]:
        """The planner's input: measured costs, with load as queue wait (topology/costs.py).

        compute_ms = `step_ms` (its step with one more sequence), queue_ms = `queue_ms` (step time x
        sequences / load_knee). An unmeasured replica is assumed as fast as its stage's measured mean
        (1 ms if none is), so a new replica is neither shunned nor flooded.
        """
        out = []
        for stage in self.by_stage:
            measured = [r.compute_ms for r in stage if r.compute_ms is not None and r.alive]
            fallback = sum(measured) / len(measured) if measured else 1.0
            for r in stage:
                n = len(r.sequences)
                step = step_ms(r.compute_ms, r.token_ms, n, fallback)
                out.append(ReplicaState(stage=r.stage, replica=r.replica, host=r.host, compute_ms=step,
                                        queue_ms=queue_ms(step, n, self.load_knee), inbound_ms=r.inbound_ms,
                                        alive=r.alive))
        return out

    def assign(self, route: Route, seq_id: str) -> None:
        for r in self.on_route(route):
            r.sequences.add(seq_id)
            r.served += 1

    def finish(self, route: Route, seq_id: str, release: bool = True) -> None:
        """The sequence left: its caches on the route are freed with the next message (or idle flush);
        `release=False`: someone else frees them (a decode ring's head)."""
        for r in self.on_route(route):
            if seq_id in r.sequences:
                r.sequences.discard(seq_id)
                if release:
                    r.release.append(seq_id)

    def take_queued(self, seq_id: str) -> list[Replica]:
        """The replicas whose queued frees hold `seq_id` (a preempted run's caches), its id taken out."""
        reps = [r for r in self if seq_id in r.release]
        for r in reps:
            r.release = [sid for sid in r.release if sid != seq_id]
        return reps

    def move(self, old: Route, new: Route, seq_id: str) -> None:
        """The sequence changes route: replicas it leaves free its cache; those it keeps still hold it."""
        for stage, (a, b) in enumerate(zip(old.replicas, new.replicas)):
            if a != b:
                left, joined = self.get(stage, a), self.get(stage, b)
                left.sequences.discard(seq_id)
                left.release.append(seq_id)
                joined.keep(seq_id)
                joined.sequences.add(seq_id)
                joined.served += 1

    @contextmanager
    def carrying(self, seq_ids: list[str]) -> Iterator[None]:
        """While a message carrying these sequences is on its way, none of their frees goes out: a stage
        frees none that its message carries, and a message composed before a sequence ended (a step, a
        recovery's rebuild) writes its cache again after any free that overtook it."""
        self.in_flight.update(seq_ids)
        try:
            yield
        finally:
            self.in_flight -= Counter(seq_ids)  # drops the zeros

    def take_release(self, route: Route | None = None) -> dict[tuple[int, int], list[str]]:
        """Finished sequences to free on this route's replicas (all replicas: None), by (stage, replica),
        leaving those in flight queued; a message carries their union (a stage ignores ids it never held)
        and, should it not arrive, `give_back` queues them again."""
        taken = {}
        for r in self.on_route(route) if route is not None else self:
            ids = [sid for sid in r.release if sid not in self.in_flight]
            if ids:
                taken[(r.stage, r.replica)] = ids
                r.release = [sid for sid in r.release if sid in self.in_flight]
        return taken

    def give_back(self, taken: dict[tuple[int, int], list[str]]) -> None:
        """Queues again the frees of a message that failed on its way (a stage it never reached, or a
        dead one's replacement, still holds those caches); the stages it did reach ignore them."""
        for key, ids in taken.items():
            r = self._index.get(key)
            if r is not None:
                r.free_later(ids)

    def observe_trace(self, trace: list[tuple[int, int, float, float]], tokens: int | None = None) -> None:
        """A step's per-hop measurements: (stage, replica, inbound_ms, compute_ms); `tokens` in that step."""
        for stage, replica, inbound_ms, compute_ms in trace:
            rep = self._index.get((stage, replica))
            if rep is not None:
                rep.observe(inbound_ms, compute_ms)
                rep.busy_ms += compute_ms
                if tokens:
                    rep.token_ms = ema(rep.token_ms, compute_ms / tokens)
                if tokens and tokens >= PREFILL_MIN_TOKENS and compute_ms > 0:  # the fixed step cost amortised
                    rep.prefill_ms = ema(rep.prefill_ms, compute_ms / tokens)

    def describe(self) -> list[list[dict[str, Any]]]:
        return [[{"name": r.name, "host": r.host, "alive": r.alive, "gone": r.gone, "draining": r.draining, "inflight": r.inflight, "sequences": len(r.sequences),
                  "served": r.served, "compute_ms": r.compute_ms, "inbound_ms": round(r.inbound_ms, 3)}
                 for r in stage] for stage in self.by_stage]


NEVER_STARTED = ("PENDING_CREATION", "DEPENDENCIES_UNREADY")  # Ray's states of an actor not yet placed


def deployed_infos(replicas: list[list[Any]], journal: Any, incarnation: int) -> list[list[dict]]:
    """The stages' `ready` infos for a router started beside them: on its first start it waits for them
    (a stage that fails to load fails it, as it fails the deploy) and journals them; a restarted router
    reads them back (`live_replica_set` then prefers the stages that answer now)."""
    if incarnation:
        return journal.deployed_replicas()
    futures = [h.ready.remote().future() for stage in replicas for h in stage]  # ray.get would warn: an async actor
    flat = [f.result() for f in futures]
    infos, i = [], 0
    for stage in replicas:
        infos.append(flat[i:i + len(stage)])
        i += len(stage)
    journal.keep_replicas(infos)
    return infos


def live_replica_set(deployment: str, replicas: list[list[Any]], replica_info: list[list[dict]],
                     timeout_s: float = 60.0) -> tuple[list[list[Any]], list[list[dict]]]:
    """A restarted router's replicas as they are now, not as deployed: the stage actors Ray knows by name
    (added ones join, drained ones are gone, ones placed anew after a node loss are their new actors).
    Its constructor's arguments are the deploy-time set; each stage keeps at least what it had when
    no named actor of it is found (Ray may be restarting them)."""
    import re

    import ray

    from actors.gcs import actor_record
    from actors.naming import NAMESPACE, actor_name, stage_name

    pattern = re.compile(re.escape(actor_name(deployment, "")) + r"stage-(\d+)/replica-(\d+)$")
    found: dict[int, list[int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        m = pattern.match(entry["name"]) if entry.get("namespace") == NAMESPACE else None
        if m and int(m.group(1)) < len(replicas):
            found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    out, infos = [], []
    for stage, (handles, info) in enumerate(zip(replicas, replica_info)):
        ids = sorted(found.get(stage, []))
        got, ready = [], []
        for r in ids:  # a drained one may still be named for a moment after its kill: skipped
            try:
                h = ray.get_actor(stage_name(deployment, stage, r), namespace=NAMESPACE)
                if actor_record(h)[0] in NEVER_STARTED:  # an add the old router made, left waiting for a GPU
                    ray.kill(h, no_restart=True)
                    log.warning("stage %d replica %d was still waiting to be placed: given up", stage, r)
                    continue
                ready.append(ray.get(h.ready.remote(), timeout=timeout_s))
                got.append(h)
            except (ValueError, ray.exceptions.RayError) as e:
                log.warning("stage %d replica %d is named but does not answer (%s): left out", stage, r,
                            type(e).__name__)
        out.append(got or handles)
        infos.append(ready or info)
    return out, infos


def default_micro_batches(stages: list[dict[str, Any]]) -> int:
    """Lanes in flight (`stages`: each stage's `ready()` info): one per piece of hardware the stages
    occupy, so that each works while the others do. CPU stages on one node share its cores and memory
    bandwidth: one lane lets each pass take them all and read the weights once for the whole batch
    (measured on 2 cores, SmolLM2, S = 2, batch 16: 81 ms a step with one lane, 139 with two). GPU
    stages: one lane per GPU; stages sharing a GPU (fractional `num_gpus`) take turns on it, and a lane
    each would only multiply its kernel launches (README: GPU benchmark)."""
    if all(x["device"].startswith("cpu") for x in stages):
        units = {x.get("node_id") for x in stages}
    else:  # a GPU is (node, Ray's GPU ids); a stage whose ids are unknown counts as its own
        units = {(x.get("node_id"), tuple(x["gpu_ids"])) if x.get("gpu_ids") else i
                 for i, x in enumerate(stages)}
    return max(1, min(len(stages), len(units)))
