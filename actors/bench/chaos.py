"""`meshpipe chaos`: concurrent generations while random stage actors are killed.

One deployment serves the same prompts twice: once undisturbed (the reference), then again while
a killer thread `ray.kill`s a random stage replica every `kill_every` pipeline steps (only in
stages with no replica restarting, unless `overlap`: one failure per stage at a time). Every
request must complete, with greedy tokens identical to the reference. The result reports lost
requests, mismatches and recovery times (the router's: failed step to step redone; and kill to
that recovery's end).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray

from actors.naming import NAMESPACE, stage_name
from actors.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class ChaosResult:
    requests: int  # requests in the chaos run
    kills: int  # stage actors killed
    lost: int  # requests that failed or never finished
    mismatches: int  # finished requests whose tokens differ from the fault-free run
    recoveries: int  # failed steps the router recovered
    recovery_p50_s: float | None  # failed step -> step redone (wait or failover, cache rebuild, re-run)
    recovery_p99_s: float | None
    wait_p50_s: float | None  # the part of a recovery spent failing over or waiting for Ray's restart
    wait_p99_s: float | None
    kill_to_resume_p50_s: float | None  # kill -> end of the first recovery after it
    kill_to_resume_p99_s: float | None
    tokens: int  # tokens generated in the chaos run
    chaos_s: float  # wall time of the chaos run
    clean_s: float  # wall time of the same requests undisturbed
    setup: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the first few failures, for the log

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chaos_prompts(n: int, tokenizer_model: bool, seed: int = 0) -> list[Any]:
    """`n` distinct prompts: sentences for a model with a tokenizer, token-id lists otherwise."""
    rng = random.Random(seed)
    if tokenizer_model:
        topics = ["rivers", "the moon", "bread", "volcanoes", "chess", "bees", "trains", "glaciers", "music",
                  "the ocean", "owls", "paper", "copper", "tea", "maps", "clocks", "salt", "bridges"]
        return [f"Write one sentence about {topics[i % len(topics)]} ({i})." for i in range(n)]
    return [[rng.randrange(1, 250) for _ in range(rng.randint(2, 24))] for _ in range(n)]


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def run_chaos(model: str, requests: int = 50, kills: int = 10, kill_every: int = 4, num_stages: int = 3,
              replicas: int = 1, max_new_tokens: int = 24, seed: int = 0, dtype: str = "auto",
              name: str = "chaos", hop_delay_s: float = 0.0, timeout_s: float = 600.0, overlap: bool = False,
              **deploy: Any) -> ChaosResult:
    """Deploys `model`, runs `requests` generations clean and then under `kills` kills; see the module doc."""
    rng = random.Random(seed)
    pipe = Pipeline.deploy(model, num_stages=num_stages, replicas_per_stage=replicas, dtype=dtype, name=name,
                           max_restarts=kills + 2, **deploy)
    try:
        if hop_delay_s:
            pipe.set_hop_delay(0, hop_delay_s)  # emulates accelerator time, so steps outlast restarts
        prompts = chaos_prompts(requests, pipe.describe()["config"].get("vocab_size", 0) > 1000, seed)
        t0 = time.perf_counter()
        clean = _run(pipe, prompts, max_new_tokens, timeout_s)
        clean_s = time.perf_counter() - t0
        if any(isinstance(c, BaseException) for c in clean):
            bad = next(c for c in clean if isinstance(c, BaseException))
            raise RuntimeError(f"the fault-free run failed: {bad}")
        before = pipe.stats()["router"]["recoveries_total"]
        victims = [(k, r) for k in range(num_stages) for r in range(replicas)]
        kill_times: list[float] = []
        done = threading.Event()

        def killer() -> None:
            restarting: dict[int, Any] = {}  # stage -> its killed replica's ready call
            start = _steps(pipe)
            while len(kill_times) < kills and not done.is_set():
                for stage, ref in list(restarting.items()):
                    if ray.wait([ref], timeout=0)[0]:
                        del restarting[stage]
                table = ray.get(pipe.router.stats.remote())["replicas"]
                busy = {(k, r) for k, stage in enumerate(table) for r, rep in enumerate(stage)
                        if rep["sequences"]}  # a kill that hurts someone
                whole = {k for k, stage in enumerate(table) if all(rep["alive"] for rep in stage)}  # in the router's eyes
                ready = [v for v in victims if v in busy and (overlap or (v[0] not in restarting and v[0] in whole))]
                if not ready or _steps(pipe) < start + kill_every * (len(kill_times) + 1):
                    time.sleep(0.02)
                    continue
                stage, replica = rng.choice(ready)
                handle = ray.get_actor(stage_name(name, stage, replica), namespace=NAMESPACE)
                kill_times.append(time.time())
                log.warning("chaos: killing stage-%d/replica-%d", stage, replica)
                ray.kill(handle, no_restart=False)
                time.sleep(0.05)  # Ray marks it restarting within milliseconds
                restarting[stage] = handle.__ray_ready__.remote()

        thread = threading.Thread(target=killer, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        outs = _run(pipe, prompts, max_new_tokens, timeout_s)
        chaos_s = time.perf_counter() - t0
        done.set()
        thread.join(timeout=30)
        router = pipe.stats()["router"]
        recovered = router["recoveries_total"] - before
        # [end wall time, seconds, of which failover/wait]: this run's, as far as the router keeps them
        rec = router["recoveries"][-recovered:] if recovered else []
        durations = [d for _, d, _ in rec]
        waits = [w for _, _, w in rec]
        resume = []
        for k in kill_times:
            after = [end for end, _, _ in rec if end >= k]
            if after:
                resume.append(min(after) - k)
        errors = [f"{type(o).__name__}: {o}" for o in outs if isinstance(o, BaseException)]
        mismatches = sum(1 for o, c in zip(outs, clean)
                         if not isinstance(o, BaseException) and o.token_ids != c.token_ids)
        return ChaosResult(
            requests=requests, kills=len(kill_times), lost=len(errors), mismatches=mismatches,
            recoveries=recovered, recovery_p50_s=_pct(durations, 50), recovery_p99_s=_pct(durations, 99),
            wait_p50_s=_pct(waits, 50), wait_p99_s=_pct(waits, 99),
            kill_to_resume_p50_s=_pct(resume, 50), kill_to_resume_p99_s=_pct(resume, 99),
            tokens=sum(len(o.token_ids) for o in outs if not isinstance(o, BaseException)),
            chaos_s=round(chaos_s, 3), clean_s=round(clean_s, 3),
            setup={"model": model, "stages": num_stages, "replicas": replicas, "kill_every": kill_every,
                   "overlap": overlap, "replicate_every": deploy.get("replicate_every", 0),
                   "max_new_tokens": max_new_tokens, "hop_delay_s": hop_delay_s, "dtype": dtype},
            errors=errors[:5],
        )
    finally:
        pipe.shutdown()


def _steps(pipe: Pipeline) -> int:  # pipeline steps so far (all lanes)
    return ray.get(pipe.router.stats.remote())["steps"]


def _run(pipe: Pipeline, prompts: list[Any], max_new_tokens: int, timeout_s: float) -> list[Any]:
    """Submits every prompt at once (greedy, EOS ignored) and collects completions or errors."""
    rids = [pipe.submit(p, max_new_tokens=max_new_tokens, ignore_eos=True, timeout_s=timeout_s) for p in prompts]
    outs: list[Any] = []
    for rid in rids:
        try:
            outs.append(pipe.result(rid, timeout=timeout_s))
        except Exception as e:  # noqa: BLE001 - a lost request is the measurement
            outs.append(e)
    return outs
