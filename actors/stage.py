"""A stage: some consecutive layers of the model, their KV caches, and (last stage) sampling.

Plain class; `Pipeline.deploy` wraps it with `ray.remote` (one actor per stage replica, one GPU
each by default). `forward` is never retried by Ray (`max_task_retries=0`): a step re-run on a
fresh actor without its cache would be wrong, so recovery belongs to the router.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import torch

from actors.wire import (
    ChecksumError,
    Envelope,
    Header,
    LinkCodec,
    MessageError,
    OutOfOrderError,
    ReplayError,
    load_key,
    subkey,
    pack,
)
from actors.channels import ChannelError
from actors.compute import ComputeThread, default_threads, usable_cores
from actors.gcs import own_restarts
from actors.history import OutputHistory
from actors.naming import NAMESPACE, stage_name
from actors.ring_stage import RingMember, RingSpec
from actors.specs import StageSetup
from actors.metrics import StageMetrics
from models import (
    Batch,
    CacheMissError,
    InvalidRequestError,
    ModelConfig,
    SamplingParams,
    build_stage,
    default_pool_tokens,
    load_stage,
    sample,
)
from models.drafter import ModelDrafter
from topology.split import StageSpec

log = logging.getLogger(__name__)

RING_SETUP = "ring_setup"  # the concurrency group `ring_start` runs in (its own threads)
RING_SETUPS = 4  # rings a replica may be connecting at once
SENT_KEPT = 256  # messages a stage can resend (their headers; the tensors come from the output history)
APPLIED_KEPT = 65536  # message ids remembered against replays


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor if torch can use it, else the CPU."""
    try:
        gpu_ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - outside Ray
        gpu_ids = []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def _locked(method: Any) -> Any:
    """Runs the method on the stage's compute thread, under its lock (ring threads share the caches)."""
    @functools.wraps(method)
    def run(self: StageActor, *args: Any, **kwargs: Any) -> Any:
        def locked() -> Any:
            with self.lock:
                return method(self, *args, **kwargs)
        return self.compute.run(locked)
    return run


def omp_env(spin_count: int | None) -> dict[str, Any]:
    """Actor options setting OpenMP's spin in a stage process (`StageOptions.omp_spin_count`), read as torch
    loads, so before the process starts; none where the environment or the job chose its own wait policy."""
    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    if spin_count is None or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & (os.environ.keys() | job_env.keys()):
        return {}
    return {"runtime_env": {"env_vars": {"GOMP_SPINCOUNT": str(spin_count)}}}


@dataclass
class StageLauncher:
    """How to start a stage replica actor: at deploy, and again on another node after a node loss."""

    setup: StageSetup  # what every replica of the deployment shares
    resources: dict[str, Any]  # num_gpus / num_cpus / ... per replica
    spread: bool = False  # replicas of a stage on different nodes (SPREAD) when no placement pins them

    def launch(self, spec: StageSpec, replica: int, options: dict[str, Any] | None = None) -> Any:
        """Starts the replica's actor (named meshpipe/<deployment>/stage-k/replica-r); returns its handle."""
        spread = {"scheduling_strategy": "SPREAD"} if self.spread else {}
        env = omp_env(self.setup.stage.omp_spin_count)
        # `ring_start` runs beside the default group's one thread (Ray takes the groups here, not in .options)
        return ray.remote(concurrency_groups={RING_SETUP: RING_SETUPS})(StageActor).options(
            name=stage_name(self.setup.deployment, spec.index, replica), namespace=NAMESPACE,
            lifetime="detached", max_restarts=self.setup.stage.max_restarts, max_task_retries=0,
            allow_out_of_order_execution=True,  # a call waiting on a dead replica's output blocks no other
            **{**spread, **env, **self.resources, **(options or {})},
        ).remote(self.setup, spec, replica)


class StageActor:
    def __init__(self, setup: StageSetup, spec: StageSpec, replica: int = 0) -> None:
        t0 = time.perf_counter()
        deployment, dtype, weights = setup.deployment, setup.stage.dtype, setup.weights
        self.deployment, self.spec, self.replica = deployment, spec, replica
        self.name = stage_name(deployment, spec.index, replica)
        # the deployment's wire key (HKDF of its key, else of MESHPIPE_KEY here)
        self.key = subkey(setup.key if setup.key is not None else load_key(), f"wire:{deployment}")
        self.max_retransmits = setup.wire.max_retransmits
        self.encrypt_always = setup.wire.encryption == "always"  # then plaintext is refused on every link
        self.device = pick_device()
        self.cores = usable_cores()  # this process's cores (affinity, cgroup quota), not Ray's logical CPUs
        self.threads = setup.stage.threads_per_stage or default_threads(setup.num_stages, str(self.device), self.cores)
        # on CPUs without a set count, a ring pass takes the cores the stages computing at once leave it
        self.adaptive = setup.stage.threads_per_stage is None and str(self.device).startswith("cpu")
        self.num_stages = setup.num_stages
        torch.set_num_threads(self.threads)
        self.compute = ComputeThread(self.threads)  # every torch computation of this stage runs there
        cfg = ModelConfig.from_dict(setup.model)
        if weights is not None:  # the deployment's weights actor keeps them in the object store
            from actors.weights import fetch_stage_state

            state = fetch_stage_state(weights, spec, dtype, str(self.device))
            self.model = self.compute.run(build_stage, cfg, spec.layers, state, self.device,
                                          embed=spec.embed, head=spec.head)
        else:
            self.model = self.compute.run(load_stage, setup.source, spec.layers, dtype, self.device, cfg,
                                          embed=spec.embed, head=spec.head)
        self.model.fuse_linears(setup.stage.fuse_linears)
        self.model.cuda_graphs(setup.stage.cuda_graphs)
        self.cache = self.compute.run(self.model.new_cache, self._pool_tokens(setup, cfg), setup.stage.kv_block_size,
                                      setup.stage.prefix_caching)
        # the first stage heads decode rings: it drafts for speculative sequences (a draft model, or prompt lookup)
        self.drafter = self.compute.run(self._drafter, setup) if spec.index == 0 and setup.stage.draft_model else None
        # more threads pay off only for a stage with real work (a tiny test model's ops stay serial, and
        # idle OpenMP workers spinning in 4 processes on 2 cores cost it 3x): ~1M parameters and up
        self.adaptive = self.adaptive and sum(p.numel() for p in self.model.parameters()) >= 2**20
        if self.threads == 1 and not self.adaptive:
            self.compute.serial()
        self.dtype = next(self.model.parameters()).dtype
        self.delay_s = 0.0  # test hook: extra seconds before each forward (a slow inbound hop)
        self.step_time_s = 0.0  # test hook: seconds each step sleeps as if computing (an accelerator's time)
        self.token_time_s = 0.0  # test hook: plus this per token of the step (compute-bound work)
        self.history = OutputHistory()  # what this stage sent on, per sequence (resends, cache rebuilds)
        self.lock = threading.RLock()  # one step at a time: Ray calls and ring threads share the caches
        self.rings: dict[str, RingMember] = {}  # decode rings this replica is in
        self.draft_from: dict[str, int] = {}  # sequence -> first position its last ring pass drafted
        self.sent: OrderedDict[int, tuple[Header, LinkCodec]] = OrderedDict()  # msg id -> what it sent
        self.applied: OrderedDict[tuple[str, int], int] = OrderedDict()  # (sender, msg id) -> attempt applied
        self._handle: Any = None
        self.faults: list[str] = []  # test hook: "corrupt" / "drop" for the next outgoing messages
        self.counters = {"retransmits_asked": 0, "resends": 0, "checksum_failures": 0, "rejected": 0}
        self.steps = 0
        self.busy_s = 0.0
        self.step_ema_s = 0.0
        self.phases_ms: dict[str, float] = {}  # a step's parts, moving averages (`phase`)
        self.load_s = time.perf_counter() - t0
        self.metrics = StageMetrics(deployment, spec.index, replica)
        self.restarts = own_restarts() or 0  # fixed for this process: a restart is a new process
        self.metrics.restart_count = self.restarts
        self.metrics.refresh(0)
        log.info("%s replica %d ready on %s (%d threads) in %.1f s", spec.label, replica, self.device,
                 torch.get_num_threads(), self.load_s)

    def _drafter(self, setup: StageSetup) -> ModelDrafter:
        model = load_stage(setup.stage.draft_model, dtype=setup.stage.dtype, device=self.device)
        return ModelDrafter(model, max_sequences=setup.max_sequences)

    def _pool_tokens(self, setup: StageSetup, cfg: ModelConfig) -> int:
        """The KV pool's size: kv_cache_tokens, else `default_pool_tokens` for this device."""
        if setup.stage.kv_cache_tokens is not None:
            return setup.stage.kv_cache_tokens
        p = next(self.model.parameters())
        token_bytes = 2 * len(self.spec.layers) * cfg.n_kv_heads * cfg.head_dim * p.element_size()
        per_seq = -(-cfg.max_seq_len // setup.stage.kv_block_size) * setup.stage.kv_block_size
        cap = setup.max_sequences * per_seq
        if self.device.type != "cuda":  # half the node's memory, shared by the deployment's stages at most
            import psutil

            return default_pool_tokens(token_bytes, cap, ram_share=psutil.virtual_memory().total // 2 // self.num_stages)
        fraction = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0)) or 1.0
        weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return default_pool_tokens(token_bytes, cap, torch.cuda.get_device_properties(self.device).total_memory,
                                   min(1.0, fraction), weights)

    def ready(self) -> dict[str, Any]:
        """Who and where this stage is (the router logs it and `describe` shows it)."""
        ctx = ray.get_runtime_context()
        return {
            "stage": self.spec.index,
            "replica": self.replica,
            "layers": [self.spec.layers[0], self.spec.layers[-1]],
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],  # stages with the same ids share a GPU
            "threads": self.threads,  # Ray-call steps; ring passes: the cores left them when adaptive
            "threads_adaptive": self.adaptive,
            "load_s": round(self.load_s, 3),
            "restarts": self.restarts,
            "kv_cache_tokens": self.cache.num_tokens,
            "kv_block_size": self.cache.bs,
            "prefix_caching": self.cache.prefix_caching,
        }

    def probe(self, sent_at: float) -> float:
        """Milliseconds from `sent_at` (the caller's time.time()) until this stage could start work.

        Includes the test hook's delay and any queue behind running steps, as a real message would.
        """
        self.metrics.refresh(len(self.cache), (self.cache.blocks.held, self.cache.blocks.available))  # every second
        return self._arrive(sent_at)

    def forward(self, env: Envelope, params: list[SamplingParams] | None = None) -> Envelope | Any:
        """One Ray-call step (`_forward`), on the compute thread."""
        return self.compute.run(self._forward, env, params)

    def _forward(self, env: Envelope, params: list[SamplingParams] | None = None) -> Envelope | Any:
        """One step of one micro-batch: verify and decode, embed (first), run the layers, sample (last).

        In router mode only the last stage gets `params` (sampling options); in push mode they
        ride in the envelope with the route's remaining stages (`hops`), and a stage calls the next
        itself and returns that call's ObjectRef (the router follows the chain of refs to the last
        stage's sampled tokens). Each hop appends (stage, replica, inbound ms, compute ms) to `trace`.
        A message that fails its checksum is asked again from its sender (`max_retransmits`);
        a replayed or out-of-order step is rejected (ReplayError / OutOfOrderError) before any
        cache changes.
        """
        inbound_ms = self._arrive(env.sent_at)
        header, x, resends = self._receive(env)
        t0 = time.perf_counter()
        y = self.apply(header, x)
        control = {"params": env.params, "hops": env.hops[1:], "links": env.links,
                   "retransmits": env.retransmits + resends}
        if self.model.is_last:
            out = Envelope(None, header.msg_id, **control)
            positions = [s + n for s, n in zip(header.starts, header.lengths)]
            out.sampled, out.logprobs = sample(y, params or env.params, positions)
            out.params = None
        else:
            link = self._link(env.links)
            nxt = Header(kind=header.kind, step=header.step, msg_id=header.msg_id, attempt=0, sender=self.name,
                         seq_ids=header.seq_ids, starts=header.starts, lengths=header.lengths,
                         release=header.release, tokens=header.tokens)
            self._remember(nxt, link)
            try:
                out = Envelope.seal(nxt, y, link, self.key, reply_to=self._self_handle(), **control)
            except ValueError as e:  # int8 cannot carry inf/NaN: send this one lossless
                log.warning("%s: %s; message %d goes uncompressed", self.name, e, header.msg_id)
                link = replace(link, codec="none")
                self.sent[nxt.msg_id] = (nxt, link)
                out = Envelope.seal(nxt, y, link, self.key, reply_to=self._self_handle(), **control)
            out.wire = self._inject(out.wire)
        dt = time.perf_counter() - t0
        self.account(dt, y, None if self.model.is_last else out.wire)
        out.trace = [*env.trace, (self.spec.index, self.replica, inbound_ms, dt * 1e3)]
        out.sent_at = time.time()
        if env.hops and not self.model.is_last:
            return env.hops[0].forward.remote(out)
        return out

    def apply(self, header: Header, x: torch.Tensor, logits_at: torch.Tensor | None = None,
              ring: bool = False) -> torch.Tensor:
        """Runs one verified message through this stage's layers (under the compute lock): order check,
        releases, the cache, the test hooks, and (not last) the output history. `ring`: a decode ring's
        step, which may rewrite positions its sequence's last pass drafted (rejected drafts), nothing else."""
        with self.lock:
            self._check_order(header, ring)
            self.applied[(header.sender, header.msg_id)] = header.attempt
            while len(self.applied) > APPLIED_KEPT:
                self.applied.popitem(last=False)
            if ring and self.adaptive:
                self._threads_for(header.lanes)
            if header.release:  # never a sequence this very message carries
                carried = set(header.seq_ids)
                self._forget([sid for sid in header.release if sid not in carried])
            if not header.seq_ids:
                return x
            t0 = time.perf_counter()
            b = Batch.build(header.seq_ids, header.starts, header.lengths)  # the model moves it if it needs it
            x = x.to(self.device) if self.model.is_first else x.to(self.device, self.dtype)
            t1 = time.perf_counter()
            y = self.model(x, b, self.cache, **({"logits_at": logits_at.to(self.device)} if logits_at is not None
                                                 else {}))
            t2 = time.perf_counter()
            self.phase("inputs", t1 - t0)
            self.phase("forward", t2 - t1)
            self.cache.commit(b, header.tokens or None, [len(d) for d in header.drafts] if header.drafts else None)
            if not self.model.is_last:
                self.history.record(header.seq_ids, header.starts, header.lengths, y)
            self.phase("after", time.perf_counter() - t2)
            if self.step_time_s or self.token_time_s:  # test hook: emulated accelerator time, counted as compute
                time.sleep(self.step_time_s + self.token_time_s * sum(header.lengths))
            for i, sid in enumerate(header.seq_ids):  # positions a later step may rewrite: this pass's drafts
                if header.drafts and header.drafts[i]:
                    self.draft_from[sid] = header.starts[i] + header.lengths[i] - len(header.drafts[i])
                else:
                    self.draft_from.pop(sid, None)
            return y

    def _threads_for(self, lanes: int) -> None:
        """Torch threads for a ring pass with `lanes` micro-batches in flight: a lone lane has one stage
        computing at a time, which may take every core; more share them (measured: README)."""
        want = max(1, self.cores // max(1, min(lanes, self.num_stages)))
        if want != torch.get_num_threads():
            torch.set_num_threads(want)

    def phase(self, name: str, seconds: float) -> None:
        """A part of a step into its moving average: "receive" (a ring message's checks and decoding),
        "inputs" (the step's batch, and its input on the device), "forward" (the layers' call: on a GPU,
        launching them), "after" (the KV cache's commit and the output history), "sample" (the last stage's
        sampling: on a GPU it waits for the step's kernels), "send" (encoding and sending on: on a GPU the
        copy to the host waits for them)."""
        ms, old = seconds * 1e3, self.phases_ms.get(name)
        self.phases_ms[name] = ms if old is None else 0.9 * old + 0.1 * ms

    def account(self, dt: float, y: torch.Tensor, wire: np.ndarray | None = None) -> None:
        """One step's time and sizes into the stats and metrics."""
        self.steps += 1
        self.busy_s += dt
        self.step_ema_s = dt if self.steps == 1 else 0.9 * self.step_ema_s + 0.1 * dt
        self.metrics.step(dt * 1e3, wire, y.numel() * y.element_size(), len(self.cache))

    # ---------- decode rings (actors.ring_stage): the per-token path without the router ----------

    def ring_open(self, spec: RingSpec, lanes: int) -> tuple[str, int] | None:
        """Joins a ring as member `spec.index`; returns the address its previous member connects to."""
        self.ring_stop(spec.ring_id)
        self.rings[spec.ring_id] = RingMember(self, spec, lanes)
        return self.rings[spec.ring_id].address()

    @ray.method(concurrency_group=RING_SETUP)
    def ring_start(self, ring_id: str, next_addr: tuple[str, int] | None, timeout_s: float = 30.0) -> str:
        """Connects the ring's channels; on a thread of its own, so that while it waits for a member that
        died meanwhile, the router's `ring_stop` (which ends the wait) and its recovery calls still run."""
        member = self.rings.get(ring_id)
        if member is None:
            raise ChannelError(f"{self.name}: ring {ring_id} was stopped before it started")
        member.start(next_addr, timeout_s)
        return self.name

    def ring_params(self, ring_id: str, items: dict[str, tuple[SamplingParams, int]]) -> None:
        self._ring(ring_id).params(items)

    def ring_admit(self, ring_id: str, items: list[tuple[str, list[int], int, int, SamplingParams]]) -> None:
        self._ring(ring_id).admit(items)

    def ring_cancel(self, ring_id: str, rids: list[str]) -> None:
        ring = self.rings.get(ring_id)
        if ring is not None:
            ring.cancel(rids)

    def ring_resend(self, ring_id: str, msg_id: int) -> Any:
        return self._ring(ring_id).resend(msg_id)

    def ring_stop(self, ring_id: str | None = None) -> int:
        """Stops one ring (None: every ring) on this replica; returns how many it stopped."""
        ids = list(self.rings) if ring_id is None else [ring_id] if ring_id in self.rings else []
        for rid in ids:
            self.rings.pop(rid).stop()
        return len(ids)

    def rewind(self, lengths: dict[str, int]) -> dict[str, int]:
        """Keeps at most `lengths[sid]` positions of each sequence (what the router knows it generated);
        returns the positions each now holds."""
        with self.lock:
            held = {}
            for sid, n in lengths.items():
                have = self.cache.length_of.get(sid, 0)
                if have > n:
                    self.cache.rewind(sid, n)
                    self.history.truncate(sid, n)
                self.draft_from.pop(sid, None)
                held[sid] = min(have, n)
            return held

    def _ring(self, ring_id: str) -> RingMember:
        ring = self.rings.get(ring_id)
        if ring is None:
            raise InvalidRequestError(f"{self.name} is not in ring {ring_id} (it stopped, or this replica restarted)")
        return ring

    def resend(self, msg_id: int) -> np.ndarray | None:
        """The message `msg_id` again, rebuilt from the output history (kind "retransmit")."""
        if msg_id not in self.sent:
            raise CacheMissError(f"{self.name} no longer has message {msg_id} (it keeps the last {SENT_KEPT})")
        header, link = self.sent[msg_id]
        self.counters["resends"] += 1
        again = replace(header, kind="retransmit" if header.kind == "step" else header.kind,
                        attempt=header.attempt + 1)
        self.sent[msg_id] = (again, link)
        y = self.history.gather(header.seq_ids, header.starts, header.lengths)
        return self._inject(pack(again, y, link, self.key))

    @_locked
    def pin_prefix(self, items: list[tuple[str, list[bytes]]]) -> list[int]:
        """New sequences start on this stage's cached blocks of their prompts' longest cached prefixes
        (each: its id and the hash chain of its prompt's full blocks); returns the positions each holds."""
        return [self.cache.pin_prefix(sid, hashes) for sid, hashes in items]

    def have(self, seq_ids: list[str]) -> list[tuple[int, int]]:
        """Per sequence: positions cached (0 after a restart), and the first position of its output
        history (> 0 when it began on cached prefix blocks): what a recovery must rebuild, and from where
        this stage can replay its outputs to the next."""
        out = []
        for sid in seq_ids:
            cached, first = self.cache.length_of.get(sid, 0), self.history.first(sid)
            out.append((cached, first if self.history.length(sid) > first else cached))  # no outputs: none to replay
        return out

    @_locked
    def replay(self, header: Header, links: list[LinkCodec]) -> Envelope:
        """A "rebuild" message of this stage's past outputs (from its history) for the next stage."""
        y = self.history.gather(header.seq_ids, header.starts, header.lengths)
        h = replace(header, kind="rebuild", sender=self.name)
        return Envelope.seal(h, y, self._link(links), self.key, links=links)

    @_locked
    def replicate(self, standby: Any, seq_ids: list[str], starts: list[int]) -> tuple[list[Any], list[int]]:
        """Copies positions starts[i].. of each sequence's KV cache (and output history) to `standby`.

        Returns ([the standby's `absorb` call], the positions each copy reaches). The call is not
        awaited here: two replicas copying to each other must not wait on one another.
        """
        payload = {}
        ends = []
        for sid, start in zip(seq_ids, starts):
            end = self.cache.length_of.get(sid, 0)
            ends.append(end)
            if sid in self.cache and start < end:
                hist = self.history.gather([sid], [start], [end - start]) \
                    if self.history.first(sid) <= start and self.history.length(sid) >= end else None
                payload[sid] = (start, self.cache.export(sid, start), hist)
        return [standby.absorb.remote(payload)], ends

    @_locked
    def absorb(self, payload: dict[str, tuple[int, dict, torch.Tensor | None]]) -> dict[str, int]:
        """Takes another replica's copies (KV positions and output history) of sequences it serves."""
        held = {}
        for sid, (start, kv, hist) in payload.items():
            have = self.cache.length_of.get(sid, 0)
            held[sid] = self.cache.load(sid, start, kv)
            if hist is not None and self.history.length(sid) == have and start <= have < start + hist.shape[0]:
                self.history.record([sid], [have], [start + hist.shape[0] - have], hist[have - start:])
        return held

    def inject_fault(self, kind: str, count: int = 1) -> None:
        """Test hook: corrupt (flip one byte) or drop the next `count` messages this stage sends."""
        if kind not in ("corrupt", "drop", "none"):
            raise InvalidRequestError(f"fault kind {kind!r}: choose corrupt, drop or none (delay: set_delay)")
        self.faults = [] if kind == "none" else [kind] * count

    def _receive(self, env: Envelope) -> tuple[Header, torch.Tensor, int]:
        """Opens the message; on a checksum failure asks the sender again, up to max_retransmits."""
        asked = 0
        while True:
            try:
                header, x = env.open(self.key)
                self._expect_sealed(header, env.links[self.spec.index].encrypt if env.links else False)
                return header, x, asked
            except ChecksumError as e:
                self.counters["checksum_failures"] += 1
                if asked >= self.max_retransmits:
                    self.counters["rejected"] += 1
                    raise ChecksumError(f"{self.name}: message {env.msg_id} still fails after {asked} resends: {e}") from None
                asked += 1
                self.counters["retransmits_asked"] += 1
                log.warning("%s: message %d failed verification (%s); asking for resend %d", self.name, env.msg_id,
                            e, asked)
                if env.reply_to is None:
                    raise
                env = replace(env, wire=ray.get(env.reply_to.resend.remote(env.msg_id)))
            except MessageError:
                self.counters["rejected"] += 1
                raise

    def _check_order(self, h: Header, ring: bool = False) -> None:
        """Anti-replay: a message id is applied once per attempt (senders number messages from a random
        start), and a step must start where each sequence's cache ends (a rebuild may rewind; a ring
        step may rewrite the positions its sequence's last pass drafted)."""
        seen = self.applied.get((h.sender, h.msg_id))
        if seen is not None and h.attempt <= seen:
            self.counters["rejected"] += 1
            raise ReplayError(f"{self.name}: message {h.msg_id} from {h.sender!r} (attempt {h.attempt}) was "
                              "applied already: a replayed message")
        for sid, start in zip(h.seq_ids, h.starts):
            have = self.cache.length_of.get(sid, 0)
            if start < have and (ring and start >= self.draft_from.get(sid, have) or sid in self.cache.provisional):
                continue  # a pass's drafts, or a pinned prefix the route holds less of than this stage
            if start < have and h.kind != "rebuild":
                self.counters["rejected"] += 1
                raise ReplayError(
                    f"{self.name}: step {h.step} (message {h.msg_id}, kind {h.kind!r}) starts {sid!r} at position "
                    f"{start} but {have} positions are applied already: a replayed message; only a 'rebuild' may "
                    "rewrite a cache")
            if start > have:
                self.counters["rejected"] += 1
                raise OutOfOrderError(
                    f"{self.name}: step {h.step} (message {h.msg_id}) starts {sid!r} at position {start} but only "
                    f"{have} are cached: an earlier step is missing")

    def _expect_sealed(self, header: Header, link_encrypts: bool) -> None:
        """A stage whose inbound link encrypts (or whose deployment encrypts every hop) refuses plaintext."""
        if (link_encrypts or self.encrypt_always) and not header.encrypted:
            self.counters["rejected"] += 1
            raise MessageError(f"{self.name}: message {header.msg_id} from {header.sender!r} arrived in plaintext "
                               "on a link that encrypts: refused")

    def _arrive(self, sent_at: float) -> float:
        """Applies the hop-delay hook, then: ms since the sender's `sent_at` (0 when unknown)."""
        if self.delay_s:
            time.sleep(self.delay_s)
        return max(0.0, (time.time() - sent_at) * 1e3) if sent_at else 0.0

    def _link(self, links: list[LinkCodec]) -> LinkCodec:
        nxt = self.spec.index + 1
        return links[nxt] if nxt < len(links) else LinkCodec()

    def _remember(self, header: Header, link: LinkCodec) -> None:
        self.sent[header.msg_id] = (header, link)
        while len(self.sent) > SENT_KEPT:
            self.sent.popitem(last=False)

    def _inject(self, wire: np.ndarray) -> np.ndarray | None:
        if not self.faults:
            return wire
        kind = self.faults.pop(0)
        if kind == "drop":
            return None
        bad = wire.copy()
        bad[len(bad) // 2] ^= 0xFF
        return bad

    def _self_handle(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_runtime_context().current_actor
        return self._handle

    def free(self, seq_ids: list[str]) -> int:
        """Drops the caches of finished or cancelled sequences; returns tokens still cached."""
        with self.lock:
            self._forget(seq_ids)
            return self.cache.tokens_held()

    def _forget(self, seq_ids: list[str]) -> None:
        """Drops the sequences' caches, histories and draft starts (the caller holds the lock)."""
        self.cache.free(seq_ids)
        self.history.free(seq_ids)
        for sid in seq_ids:  # a later run of the id starts with no drafts in flight
            self.draft_from.pop(sid, None)

    def reset(self) -> int:
        """Drops every sequence's cache and history (a restarted router's orphans); returns how many."""
        self.ring_stop()
        ids = list(self.cache.table)
        self.free(ids)
        self.sent.clear()
        return len(ids)

    def set_step_time(self, seconds: float, per_token: float = 0.0) -> None:
        """Test hook: every step also takes `seconds` + `per_token` x its tokens of emulated compute
        (sleeping: fake nodes share this machine's CPUs)."""
        self.step_time_s, self.token_time_s = float(seconds), float(per_token)

    def set_delay(self, seconds: float) -> None:
        """Test hook: delay every forward by `seconds` (emulates a slow link into this stage)."""
        self.delay_s = float(seconds)

    def stats(self) -> dict[str, Any]:
        return {
            "stage": self.spec.index,
            "replica": self.replica,
            "steps": self.steps,
            "busy_s": self.busy_s,
            "step_ema_ms": self.step_ema_s * 1e3,
            "phases_ms": {k: round(v, 3) for k, v in self.phases_ms.items()},
            "cuda_graphs": self.model.graphs.stats() if self.model.graphs is not None else None,
            "sequences": len(self.cache),
            "tokens_cached": self.cache.tokens_held(),
            **self.cache.stats(),
            "load_s": round(self.load_s, 3),
            "restarts": self.restarts,
            **self.counters,
            **({"draft_model_passes": self.drafter.passes} if self.drafter is not None else {}),
        }
