"""A stage: some consecutive layers of the model, their KV caches, and (last stage) sampling.

Plain class; `Pipeline.deploy` wraps it with `ray.remote` (one actor per stage replica, one GPU
each by default). `forward` is never retried by Ray (`max_task_retries=0`): a step re-run on a
fresh actor without its cache would be wrong, so recovery belongs to the router.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from actors.envelope import Envelope
from models import Batch, ModelConfig, SamplingParams, StageSpec, load_stage, sample

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor if torch can use it, else the CPU."""
    try:
        import ray

        gpu_ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - outside Ray
        gpu_ids = []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def default_threads(num_stages: int, device: str) -> int:
    """Torch threads per stage, chosen by measurement (README, Performance).

    On CPUs the stages share the machine's cores: one stage gets them all; several get one thread
    each, since OpenMP's barriers collapse when threads outnumber free cores (a 2-stage pipeline
    with 2 threads each ran 2-10x slower than with 1 under any other load). A GPU stage needs one.
    """
    if not device.startswith("cpu"):
        return 1
    return max(1, (os.cpu_count() or 1) // num_stages)


class StageActor:
    def __init__(self, deployment: str, source: str | Path, spec: StageSpec, config: dict,
                 dtype: str = "auto", threads: int | None = None, replica: int = 0,
                 num_stages: int = 1) -> None:
        t0 = time.perf_counter()
        self.deployment, self.spec, self.replica = deployment, spec, replica
        self.device = pick_device()
        torch.set_num_threads(threads or default_threads(num_stages, str(self.device)))
        self.model = load_stage(source, spec, dtype, self.device, ModelConfig.from_dict(config))
        self.cache = self.model.new_cache()
        self.dtype = next(self.model.parameters()).dtype
        self.delay_s = 0.0  # test hook: extra seconds before each forward (a slow inbound hop)
        self.steps = 0
        self.busy_s = 0.0
        self.step_ema_s = 0.0
        self.load_s = time.perf_counter() - t0
        log.info("%s replica %d ready on %s (%d threads) in %.1f s", spec.label, replica, self.device,
                 torch.get_num_threads(), self.load_s)

    def ready(self) -> dict[str, Any]:
        """Who and where this stage is (the router logs it and `describe` shows it)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "stage": self.spec.index,
            "replica": self.replica,
            "layers": [self.spec.layers[0], self.spec.layers[-1]],
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "load_s": round(self.load_s, 3),
        }

    def probe(self, sent_at: float) -> float:
        """Milliseconds from `sent_at` (the caller's time.time()) until this stage could start work.

        Includes the test hook's delay and any queue behind running steps, as a real message would.
        """
        if self.delay_s:
            time.sleep(self.delay_s)
        return max(0.0, (time.time() - sent_at) * 1e3)

    def forward(self, env: Envelope, params: list[SamplingParams] | None = None) -> Envelope | Any:
        """One step of one micro-batch: embed (first), run the layers, sample (last).

        In router mode only the last stage gets `params` (sampling options); in push mode they
        ride in the envelope with the route's remaining stages (`hops`), and a stage calls the next
        itself and returns that call's ObjectRef (the router follows the chain of refs to the last
        stage's sampled tokens). Each hop appends (stage, replica, inbound ms, compute ms) to `trace`.
        """
        if self.delay_s:
            time.sleep(self.delay_s)
        inbound_ms = max(0.0, (time.time() - env.sent_at) * 1e3) if env.sent_at else 0.0
        t0 = time.perf_counter()
        if env.release:
            self.cache.free(env.release)
        b = Batch.build(env.seq_ids, env.starts, env.lengths).to(self.device)
        if self.model.is_first:
            x = torch.tensor(env.tokens, dtype=torch.long, device=self.device)
        else:
            x = env.hidden(self.device).to(self.dtype)
        y = self.model(x, b, self.cache)
        out = Envelope(env.seq_ids, env.starts, env.lengths, env.step, params=env.params,
                       release=env.release, push=env.push, hops=env.hops[1:])
        if self.model.is_last:
            positions = [s + n for s, n in zip(env.starts, env.lengths)]
            out.sampled, out.logprobs = sample(y.cpu(), params or env.params, positions)
            out.params = None
        else:
            out.set_hidden(y)
        dt = time.perf_counter() - t0
        self.steps += 1
        self.busy_s += dt
        self.step_ema_s = dt if self.steps == 1 else 0.9 * self.step_ema_s + 0.1 * dt
        out.trace = [*env.trace, (self.spec.index, self.replica, inbound_ms, dt * 1e3)]
        out.sent_at = time.time()
        if env.push and env.hops and not self.model.is_last:
            return env.hops[0].forward.remote(out)
        return out

    def free(self, seq_ids: list[str]) -> int:
        """Drops the caches of finished or cancelled sequences; returns tokens still cached."""
        self.cache.free(seq_ids)
        return self.cache.tokens_held()

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
            "sequences": len(self.cache.slot_of),
            "tokens_cached": self.cache.tokens_held(),
        }
