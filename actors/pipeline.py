"""`Pipeline`: deploy a model as stage actors plus a router, then generate, stream and chat.

Everything is a named, detached Ray actor in namespace `meshpipe`
(`meshpipe/<name>/stage-2/replica-0`, `meshpipe/<name>/router-0`), so another driver, the CLI or
an HTTP server attaches with `Pipeline.connect(name)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.config import DeployConfig
from actors.detach import detached
from actors.errors import DeploymentError, InsufficientResourcesError, config_error, topology_errors
from actors.gcs import actor_record
from actors.layout import partition, place
from actors.progress import DeployProgress, ProgressFn
from actors.naming import NAMESPACE, actor_name, autoscaler_name, router_name, weights_name
from actors.router import RouterActor
from actors.specs import RouterSpec, StageSetup
from actors.wire import load_key
from actors.autoscaler import AutoscalerActor
from actors.stage import StageLauncher
from actors.weights import WeightsActor
from models import Completion, ConfigError, MeshpipeError, SamplingParams, TokenLogprob, is_batch
from topology import Gpu, StagePlacement, Topology, TopologyError, gpus_from_topology
from topology.autoscaling import AutoscalingConfig
from topology.placement import place_replicas

log = logging.getLogger(__name__)

ROUTER_RESTART_S = 60.0  # how long a caller keeps asking a restarting router
_warned_cpu = False


@dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new tokens since the previous chunk
    finish_reason: str | None = None  # set on the last chunk
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    usage: dict[str, int] | None = None  # set on the last chunk


def _next_chunk(step: dict[str, Any], cursor: int, text: str) -> tuple[StreamChunk | None, int, str, bool]:
    """One `stream_next` answer as (chunk to yield or None, new cursor, text shown so far, done)."""
    new = len(step["token_ids"])
    if step["done"]:
        c = step["completion"]
        lps = None if c.logprobs is None else c.logprobs[cursor:]
        return StreamChunk(c.text[len(text):], step["token_ids"], c.finish_reason, lps, c.usage), cursor + new, \
            c.text, True
    if not new:
        return None, cursor, text, False
    return StreamChunk(step["text"][len(text):], step["token_ids"], logprobs=step.get("logprobs")), cursor + new, \
        step["text"], False


def _unwrap(e: Exception) -> Exception:
    """Ray wraps an actor's exception; hand the caller meshpipe's own typed error."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, TopologyError):
        return config_error(cause)
    return cause if isinstance(cause, MeshpipeError) else e


def _call(ref: Any, timeout: float | None = None) -> Any:
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        raise _unwrap(e) from None


class Pipeline:
    """A handle on a deployment: its router actor (and, for `shutdown`, its stage actors)."""

    def __init__(self, name: str, router: Any) -> None:
        self.name = name
        self.router = router

    # ---------- lifecycle ----------

    @classmethod
    def deploy(cls, model: str | Path = "smollm2-135m", **options: Any) -> Pipeline:
        """Starts the stage actors and the router; returns when every stage has its weights.

        `options` are `DeployConfig`'s fields, plus `progress=`: a callable given a `DeployProgress` as
        weights are read and stages come up (`actors.TqdmProgress()` draws bars)."""
        from models.drafter import check_draft
        from models.loading import read_config, resolve_source

        progress: ProgressFn | None = options.pop("progress", None)
        dc = DeployConfig.of(str(model), **options)
        if not ray.is_initialized():
            ray.init()
        try:
            ray.get_actor(router_name(dc.name), namespace=NAMESPACE)
            raise DeploymentError(f"a deployment named {dc.name!r} is running: Pipeline.connect({dc.name!r}) "
                                  "to use it, or shut it down first")
        except ValueError:
            pass
        source = resolve_source(dc.model)
        cfg = read_config(source)
        if dc.stage.draft_model is not None:  # checked before any actor starts; stages get its resolved path
            draft = resolve_source(dc.stage.draft_model)
            check_draft(cfg, read_config(draft), repr(dc.stage.draft_model))
            dc = dc.model_copy(update={"stage": dc.stage.model_copy(update={"draft_model": str(draft)})})
        placement = None
        if dc.topology is not None:
            with topology_errors():
                placement = plan_placement(cfg, dc)
            specs = [p.stage for p in placement.stages]
            counts = [len(g) for g in placement.gpus]
        else:
            if dc.layers_per_stage is not None:
                specs = partition(cfg, layers_per_stage=dc.layers_per_stage)
            else:
                specs = partition(cfg, num_stages=dc.num_stages or 1)
            counts = replica_counts(dc.replicas_per_stage, len(specs))
            if dc.autoscaling is not None:  # start inside the bounds
                bounds = AutoscalingConfig(**dc.autoscaling)
                counts = [min(bounds.max_replicas, max(bounds.min_replicas, c)) for c in counts]
        wire = dc.wire
        key = load_key(wire.encryption_key.get_secret_value() if wire.encryption_key else None)
        if wire.encryption == "always" and key is None:
            raise ConfigError("encryption='always' needs a key: pass encryption_key= or set MESHPIPE_KEY "
                              "(python -c 'from actors.wire import new_key; print(new_key())')")
        resources = stage_resources(sum(counts), dc.stage.stage_resources, autoscaling=dc.autoscaling is not None)
        t0 = time.perf_counter()
        stages: list[list[Any]] = []
        weights = ray.remote(WeightsActor).options(  # owns the tensors in the object store; outlives stages
            name=weights_name(dc.name), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            max_restarts=-1, max_concurrency=max(8, len(specs) + 2), **(placement.options(0, 0) if placement else {}),
        ).remote(dc.name, str(source), cfg.to_dict())
        setup = StageSetup(dc.name, str(source), cfg.to_dict(), len(specs), dc.stage, wire, weights, key,
                           max_sequences=dc.router.max_active_sequences)
        launcher = StageLauncher(setup, resources, spread=max(counts) > 1)
        router = scaler = None
        try:
            for spec, count in zip(specs, counts):
                stages.append([launcher.launch(spec, r, placement.options(spec.index, r) if placement else None)
                               for r in range(count)])
            options = dc.router.model_copy(update={"message_bytes": dc.router.message_bytes or cfg.dim * 4})
            spec = RouterSpec(dc.name, str(source), cfg.to_dict(), options, wire,
                              placement.router_topology() if placement else None, key)
            # the router starts beside the stages (its imports and tokenizer overlap their loading) and
            # takes their infos once they are up; a restarted one reads them back from its journal
            router = ray.remote(RouterActor).options(
                name=router_name(dc.name), namespace=NAMESPACE, lifetime="detached",
                num_cpus=0, max_concurrency=1000, max_restarts=-1,  # a restarted router resumes from its journal
                **(placement.options(0, 0) if placement else {}),
            ).remote(spec, stages, None, launcher, specs)
            flat = [h for hs in stages for h in hs]
            _wait_ready(flat, [spec for spec, c in zip(specs, counts) for _ in range(c)],
                        dc.ready_timeout_s, progress, weights)
            ray.get(router.describe.remote())
            if dc.autoscaling is not None:
                scaler = ray.remote(AutoscalerActor).options(
                    name=autoscaler_name(dc.name), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                    max_restarts=-1,
                ).remote(dc.name, router, dc.autoscaling, float(resources.get("num_gpus", 0) or 0))
                ray.get(scaler.start.remote())
        except Exception:
            flat = [h for hs in stages for h in hs] + [weights] + [a for a in (router, scaler) if a is not None]
            for s in flat:
                ray.kill(s)
            _wait_dead(flat)
            raise
        log.info("deployed %r: %s in %d stages (%s) in %.1f s", dc.name, source.name, len(specs),
                 ", ".join(s.label for s in specs), time.perf_counter() - t0)
        return cls(dc.name, router)

    @classmethod
    def connect(cls, name: str = "default") -> Pipeline:
        """Attaches to a running named deployment (from any driver of the same Ray cluster)."""
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
        try:
            router = ray.get_actor(router_name(name), namespace=NAMESPACE)
        except ValueError:
            raise DeploymentError(f"no deployment named {name!r} in this Ray cluster: "
                                  "deploy it first (Pipeline.deploy(..., name=...))") from None
        return cls(name, router)

    def shutdown(self) -> None:
        """Stops the router and kills every actor of the deployment; returns once they are gone."""
        try:
            ray.get(self.router.shutdown.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - the router may be dead already
            log.warning("router of %r did not shut down cleanly: %s", self.name, e)
        prefix = actor_name(self.name, "")
        handles = []
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["namespace"] == NAMESPACE and a["name"].startswith(prefix):
                try:
                    handles.append(ray.get_actor(a["name"], namespace=NAMESPACE))
                except ValueError:
                    pass
        for h in handles:
            ray.kill(h)
        _wait_dead(handles)

    # ---------- requests ----------

    def generate(self, prompts: Any, max_new_tokens: int = 16, timeout_s: float | None = None,
                 **sampling: Any) -> list[Completion]:
        """Greedy by default. One prompt (str or list of ids) or a list of prompts; one Completion each.

        The requests survive a router restart: their ids are asked for again until it answers.
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        plist = list(prompts) if is_batch(prompts) else [prompts]
        rids = self._router("submit_many", plist, params, timeout_s, retry=False)
        try:
            return self._router("results", rids)  # one call, not one per request
        except BaseException:  # one failed (or the caller went away): the rest are not wanted
            for rid in rids:
                try:
                    self.cancel(rid)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            raise

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 64, timeout_s: float | None = None,
             **sampling: Any) -> Completion:
        """Applies the model's chat template, then generates the assistant's answer."""
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        return self.result(self._router("submit_chat", messages, params, timeout_s, retry=False))

    def submit(self, prompt: Any, max_new_tokens: int = 16, timeout_s: float | None = None,
               **sampling: Any) -> str:
        """Admits one request without waiting; returns its id for `result`, `cancel` or streaming."""
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        return self._router("submit", prompt, params, timeout_s, retry=False)

    def result(self, request_id: str, timeout: float | None = None) -> Completion:
        return self._router("result", request_id, timeout=timeout)

    def cancel(self, request_id: str) -> bool:
        return self._router("cancel", request_id)

    def _router(self, method: str, *args: Any, timeout: float | None = None, retry: bool = True) -> Any:
        """Calls the router; while Ray restarts it, idempotent calls (`retry`) are asked again."""
        end = time.monotonic() + ROUTER_RESTART_S
        while True:
            try:
                return _call(getattr(self.router, method).remote(*args), timeout)
            except ray.exceptions.RayActorError as e:
                self._router_lost(e, retry, end)
                time.sleep(0.2)

    async def acall(self, method: str, *args: Any, retry: bool = True) -> Any:
        """The router's method `method` from async code (an HTTP server): awaits it, raising meshpipe's
        typed errors; while Ray restarts the router, idempotent calls (`retry`) are asked again.

        The call is no child of the caller's Ray task: Ray Serve cancels an abandoned request's task
        with its children, which could stop an admission half done (its requests admitted, their ids
        lost); the caller cancels the requests it no longer wants itself."""
        end = time.monotonic() + ROUTER_RESTART_S
        while True:
            try:
                return await detached(getattr(self.router, method).remote, *args)
            except ray.exceptions.RayTaskError as e:
                raise _unwrap(e) from None
            except ray.exceptions.RayActorError as e:
                self._router_lost(e, retry, end)
                await asyncio.sleep(0.2)

    def _router_lost(self, e: ray.exceptions.RayActorError, retry: bool, end: float) -> None:
        """Returns when the router is restarting and the call may be asked again; raises otherwise."""
        dead = isinstance(e, ray.exceptions.ActorDiedError) and actor_record(self.router)[0] == "DEAD"
        if dead or not retry or time.monotonic() > end:
            raise DeploymentError(f"the router of deployment {self.name!r} is unavailable "
                                  f"({type(e).__name__}){'' if retry else ': submit again'}") from e

    async def asubmit_many(self, prompts: list[Any], params: SamplingParams | list[SamplingParams],
                           timeout_s: float | None = None) -> list[str]:
        """Admits every prompt at once, or none (BackPressureError); `params` for all, or one each. Async."""
        return await self.acall("submit_many", list(prompts), params, timeout_s, retry=False)

    def stream(self, prompt: Any, max_new_tokens: int = 16, timeout_s: float | None = None,
               **sampling: Any) -> Iterator[StreamChunk]:
        """Yields text as it is generated. Closing the iterator early cancels the request."""
        rid = self.submit(prompt, max_new_tokens, timeout_s, **sampling)
        return self._stream(rid)

    def _stream(self, rid: str) -> Iterator[StreamChunk]:
        cursor, text, done = 0, "", False
        try:
            while not done:
                step = self._router("stream_next", rid, cursor)
                chunk, cursor, text, done = _next_chunk(step, cursor, text)
                if chunk is not None:
                    yield chunk
        finally:
            if not done:
                self.cancel(rid)

    async def afollow(self, rid: str) -> AsyncIterator[StreamChunk]:
        """Async: yields an admitted request's text as it is generated; closing it early (or the task being
        cancelled, as when an HTTP client goes away) cancels the request and frees its KV caches."""
        cursor, text, done = 0, "", False
        try:
            while not done:
                step = await self.acall("stream_next", rid, cursor)
                chunk, cursor, text, done = _next_chunk(step, cursor, text)
                if chunk is not None:
                    yield chunk
        finally:
            if not done:  # sent at once (nothing to await in a cancelled task), and not as the cancelled task's child
                detached(self.router.cancel.remote, rid)

    # ---------- introspection and test hooks ----------

    def describe(self) -> dict[str, Any]:
        """The deployment: model, stages, replicas, the route a new request would take now, options."""
        return self._router("describe")

    def stats(self) -> dict[str, Any]:
        return {"router": self._router("stats"), "stages": self._router("stage_stats")}

    def set_hop_delay(self, stage: int, seconds: float, replica: int | None = None) -> None:
        """Test hook: delays every message into `stage` (one replica, or all of them) by `seconds`."""
        _call(self.router.set_hop_delay.remote(stage, seconds, replica))

    def inject_fault(self, stage: int, kind: str, count: int = 1, replica: int | None = None) -> None:
        """Test hook: `stage` corrupts ("corrupt": one byte flipped) or drops ("drop") its next `count` messages."""
        _call(self.router.inject_fault.remote(stage, kind, count, replica))

    def set_step_time(self, stage: int, seconds: float, per_token: float = 0.0) -> None:
        """Test hook: every replica of `stage` (and any added later) takes `seconds` + `per_token` x the step's
        tokens more per step, sleeping, as an accelerator's compute would (fake nodes share this machine's CPUs)."""
        _call(self.router.set_step_time.remote(stage, seconds, per_token))

    def autoscaler_decisions(self) -> list[dict[str, Any]]:
        """The decisions the deployment's autoscaler applied (empty without autoscaling=)."""
        try:
            scaler = ray.get_actor(autoscaler_name(self.name), namespace=NAMESPACE)
        except ValueError:
            return []
        return _call(scaler.decisions.remote())

    def routes_mermaid(self) -> str:
        """Mermaid flowchart of the stage replicas, the route a new request takes now drawn thick."""
        return _call(self.router.routes_mermaid.remote())


def _wait_ready(stages: list[Any], specs: list[Any], timeout_s: float, progress: ProgressFn | None = None,
                weights: Any = None) -> list[dict]:
    """Every stage's `ready` info, or a DeploymentError naming the stages that never came up.

    With `progress`, reports the stages whose weights are read and the replicas ready as they change."""
    refs = [s.ready.remote() for s in stages]
    end = time.monotonic() + timeout_s
    pending, shown = refs, (-1, -1)
    n_specs = len({s.index for s in specs})
    while pending and time.monotonic() < end:
        _, pending = ray.wait(pending, num_returns=len(pending),
                              timeout=min(0.25, end - time.monotonic()) if progress else end - time.monotonic())
        if progress is not None:
            read = min(n_specs, ray.get(weights.stats.remote())["stages_kept"]) if weights is not None else n_specs
            now = (read, len(refs) - len(pending))
            if now != shown:
                if now[0] != shown[0]:
                    progress(DeployProgress("weights", now[0], n_specs))
                if now[1] != shown[1]:
                    progress(DeployProgress("stages", now[1], len(refs)))
                shown = now
    if pending:
        late = [specs[refs.index(r)].label for r in pending]
        raise DeploymentError(
            f"{len(pending)} of {len(refs)} stages were not ready after {timeout_s:g} s ({', '.join(late[:4])}"
            f"{', ...' if len(late) > 4 else ''}): the cluster cannot place them (check stage_resources= "
            "against `ray status`) or loading is slower than ready_timeout_s"
        )
    return _call(refs)


def _wait_dead(handles: list[Any], timeout_s: float = 30.0) -> None:
    """`ray.kill` is asynchronous: wait until each actor answers as dead, so its GPU is free again."""
    end = time.monotonic() + timeout_s
    for h in handles:
        while time.monotonic() < end:
            try:
                ray.get(h.__ray_ready__.remote(), timeout=1)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                continue
            time.sleep(0.05)


@dataclass
class Placement:
    """Where `topology=` puts every stage replica: its GPU, and the Ray node that GPU's host maps to."""

    topology: Topology  # the user's topology
    stages: list[StagePlacement]  # replica 0 of each stage (layer ranges)
    gpus: list[list[Gpu]]  # [stage][replica] -> GPU
    nodes: dict[str, str]  # topology host -> Ray node id

    def options(self, stage: int, replica: int) -> dict[str, Any]:
        """Ray actor options pinning the replica to its host's node (hard node affinity)."""
        node = self.nodes[self.gpus[stage][replica].host]
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

    def router_topology(self) -> dict:
        """The topology with hosts renamed to Ray node ids, for the router's transfer costs."""
        rename = {h: self.nodes.get(h, h) for h in self.topology.spec.nodes}
        spec = self.topology.spec.model_dump()
        return {"nodes": {rename[h]: v for h, v in spec["nodes"].items()},
                "links": [{**lk, "a": rename[lk["a"]], "b": rename[lk["b"]]} for lk in spec["links"]]}


def plan_placement(cfg: Any, dc: DeployConfig) -> Placement:
    """Places the layers on the topology's GPUs (DP), the replicas on free GPUs, and maps hosts to Ray nodes."""
    topo = dc.topology if isinstance(dc.topology, Topology) else (
        Topology.from_dict(dc.topology) if isinstance(dc.topology, dict) else Topology.from_yaml(dc.topology))
    gpus = gpus_from_topology(topo)
    if not gpus:
        raise ConfigError("the topology has no GPUs (nodes' `gpus`): nothing to place the stages on")
    bytes_per_param = 2 if dc.stage.dtype == "bfloat16" else 8 if dc.stage.dtype == "float64" else 4
    stages = place(cfg, gpus, num_stages=dc.num_stages, bytes_per_param=bytes_per_param)
    counts = replica_counts(dc.replicas_per_stage, len(stages))
    chosen = place_replicas(stages, gpus, counts)
    hosts = sorted({g.host for gs in chosen for g in gs})
    placement = Placement(topo, stages, chosen, ray_nodes_for(hosts))
    log.info("placement on the topology: %s", " | ".join(
        f"{p.stage.label} on {', '.join(g.label for g in gs)}" for p, gs in zip(stages, chosen)))
    return placement


def ray_nodes_for(hosts: list[str]) -> dict[str, str]:
    """Maps topology hosts to alive Ray nodes: by node id, by IP, or by a custom resource named after the host."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    mapping = {}
    for host in hosts:
        match = [n for n in nodes if n["NodeID"] == host] or [n for n in nodes if n["NodeManagerAddress"] == host] \
            or [n for n in nodes if host in n.get("Resources", {})]
        if len(match) != 1:
            raise DeploymentError(
                f"topology node {host!r} matches {len(match)} Ray nodes: name it by its Ray node id or IP, or "
                f"start exactly one Ray node with the custom resource {host!r} (ray start --resources "
                f"'{{\"{host}\": 1}}')")
        mapping[host] = match[0]["NodeID"]
    return mapping


def replica_counts(replicas_per_stage: int | list[int], num_stages: int) -> list[int]:
    """One replica count per stage (an int applies to every stage)."""
    if isinstance(replicas_per_stage, int):
        return [replicas_per_stage] * num_stages
    if len(replicas_per_stage) != num_stages:
        raise ConfigError(f"replicas_per_stage has {len(replicas_per_stage)} counts but the model was split "
                          f"into {num_stages} stages: give one count per stage")
    return list(replicas_per_stage)


def stage_resources(num_actors: int, override: dict[str, Any] | None, autoscaling: bool = False) -> dict[str, Any]:
    """Reads the cluster's GPUs and applies `choose_stage_resources`, warning once on CPU fallback."""
    global _warned_cpu
    total = ray.cluster_resources().get("GPU", 0)
    end = time.monotonic() + 10.0  # GPUs of actors killed a moment ago come back within seconds
    while override is None and total >= num_actors > ray.available_resources().get("GPU", 0) \
            and time.monotonic() < end:
        time.sleep(0.2)
    resources = choose_stage_resources(num_actors, total, ray.available_resources().get("GPU", 0), override,
                                       autoscaling)
    if autoscaling and resources.get("num_gpus", 0) > 0:  # ask Ray's autoscaler ahead for the first replicas
        from actors.autoscaler import request_gpus

        request_gpus(num_actors, resources["num_gpus"])
    if resources.get("num_gpus") == 0 and override is None and not _warned_cpu:
        log.warning("the Ray cluster has no GPU: stages run on CPUs (pass stage_resources= to choose)")
        _warned_cpu = True
    return resources


def choose_stage_resources(num_actors: int, total_gpus: float, free_gpus: float,
                           override: dict[str, Any] | None = None, autoscaling: bool = False) -> dict[str, Any]:
    """Pure policy: one GPU per stage; CPUs when the cluster has none; fail fast on a shortfall.

    With `autoscaling`, explicit GPU resources are kept even on a cluster with no GPU yet: Ray's
    cluster autoscaler launches GPU nodes for them (workers may start at zero).
    """
    if override is not None:
        if override.get("num_gpus", 0) > 0 and total_gpus == 0 and not autoscaling:
            raise InsufficientResourcesError(
                f"stage_resources={override} asks for GPUs but the cluster has none: "
                "drop num_gpus to run stages on CPUs (or deploy with autoscaling= on an autoscaling cluster)"
            )
        return dict(override)
    if total_gpus == 0:
        return {"num_cpus": 0, "num_gpus": 0}
    if free_gpus < num_actors:
        raise InsufficientResourcesError(
            f"{num_actors} stage actors need {num_actors} GPUs (one each) but the cluster has {free_gpus:g} free "
            f"of {total_gpus:g}: use fewer stages or replicas, or pass stage_resources={{'num_gpus': "
            f"{max(free_gpus, 1) / num_actors:.2g}}} to share GPUs"
        )
    return {"num_gpus": 1, "num_cpus": 0}
