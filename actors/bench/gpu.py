"""`meshpipe bench gpu`: one GPU, the pipeline at S stages with fractional GPUs beside one process.

A random-initialised Llama of a realistic shape (`GPU_SHAPE`, ~1.1 B parameters; no weights can be
downloaded where this runs) is written on the spot, then deployed as S = 1, 2, 4 stage actors with
``num_gpus = 1/S`` each on the same GPU, and timed at batch 1, 16, 64 beside `models.generate_local`
on the same GPU in this process (eager: no compile, no CUDA graphs). Rows, in order:

- ``parity``: a tiny random Llama in float32 on the device, the pipeline (S = 2) greedy against
  transformers' `LlamaForCausalLM` greedy on the same folder: agreement fraction, identical.
- ``model``: the benchmark checkpoint (shape, parameters, seconds to write and load it).
- ``fused_linears``, ``cuda_graphs``, ``one_process_in_actor``: one process with the projections fused
  and separate; eager and with its decode steps as CUDA graphs; the one-process baseline in this driver and
  inside a Ray actor.
- ``throughput``: per (S, batch), largest first (the target's cell again with one lane per stage right
  after it, unless ``micro_batches`` is given), pipeline tokens/s beside one-process tokens/s
  measured right before it; ``efficiency`` = their ratio; ``stage_ms``: each stage's compute and
  inbound wait, ms a step; ``phases_ms``: each stage's step parts, ms (receive, inputs, the forward
  call, which on a GPU launches the kernels, after, and sample or send, which wait for them);
  ``cuda_graphs``: each stage's graphs (captured, replays, steps run uncaptured, a capture's failure).
- ``summary``: elapsed seconds and the target (largest S at the largest batch ≥ 0.8×).

``device="cpu"`` with a tiny shape runs the same code on CPUs (a smoke test of the command).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TARGET_EFFICIENCY = 0.8  # the largest S at the largest batch, against one process on the same GPU


@dataclass(frozen=True)
class LlamaShape:
    """A Llama architecture's sizes (`save_random_llama`'s keywords)."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    hidden: int  # the MLP's intermediate size
    vocab: int

    def params(self) -> int:
        """Parameters of the untied checkpoint `save_random_llama` writes."""
        hd = self.dim // self.n_heads
        attn = 2 * self.dim * self.n_heads * hd + 2 * self.dim * self.n_kv_heads * hd
        layer = attn + 3 * self.dim * self.hidden + 2 * self.dim
        return self.n_layers * layer + 2 * self.vocab * self.dim + self.dim

    def describe(self) -> dict[str, int]:
        return {**asdict(self), "params": self.params()}


GPU_SHAPE = LlamaShape(n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, hidden=8192, vocab=32000)  # 1.10 B
CPU_SHAPE = LlamaShape(n_layers=4, dim=128, n_heads=4, n_kv_heads=2, hidden=256, vocab=512)  # smoke test
PARITY_SHAPE = LlamaShape(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, hidden=128, vocab=256)
PARITY_INIT = 0.3  # wide logits: greedy choices are not near-ties that float rounding could flip


def default_shape(device: str) -> LlamaShape:
    """The benchmark's model: ~1.1 B parameters on a GPU, a tiny one on CPUs."""
    return CPU_SHAPE if device == "cpu" else GPU_SHAPE


def default_dtype(device: str) -> str:
    return "float32" if device == "cpu" else "bfloat16"


def stage_resources_for(stages: int, cpus: int) -> dict[str, float]:
    """One GPU shared by `stages` actors; one CPU each while the CPUs allow (one left to the driver)."""
    if stages < 1:
        raise ValueError(f"stages={stages}: give at least 1")
    return {"num_gpus": 1.0 / stages, "num_cpus": 1.0 if cpus >= stages + 1 else 0.0}


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    """`batch` distinct prompts of `length` token ids (no special ids 0-2)."""
    return [[3 + (7 * i + 13 * j + i * j) % (vocab - 3) for j in range(length)] for i in range(batch)]


def parity_row(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]], **extra: Any) -> dict[str, Any]:
    """Position-wise greedy agreement of meshpipe's tokens (`got`) with transformers' (`want`)."""
    pairs = [(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w)]
    total = sum(max(len(g), len(w)) for g, w in zip(got, want))
    same = sum(a == b for a, b in pairs)
    first = next(((i, j) for i, (g, w) in enumerate(zip(got, want))
                  for j in range(max(len(g), len(w))) if j >= min(len(g), len(w)) or g[j] != w[j]), None)
    identical = [list(g) for g in got] == [list(w) for w in want]
    return {"bench": "gpu", "row": "parity", "sequences": len(got), "tokens": total,
            "agreement": same / total if total else 1.0, "identical": identical,
            "first_mismatch": list(first) if first else None, **extra}


def throughput_row(stages: int, batch: int, new_tokens: int, pipeline_s: float, local_s: float,
                   **extra: Any) -> dict[str, Any]:
    """Pipeline vs one process at one (S, batch): tokens/s each (best wall time), efficiency."""
    tokens = batch * new_tokens
    return {"bench": "gpu", "row": "throughput", "stages": stages, "batch": batch, "new_tokens": new_tokens,
            "pipeline_tokens_per_s": tokens / pipeline_s, "one_process_tokens_per_s": tokens / local_s,
            "efficiency": local_s / pipeline_s, "pipeline_ms_per_step": pipeline_s * 1e3 / new_tokens,
            "one_process_ms_per_step": local_s * 1e3 / new_tokens, **extra}


def summary_row(rows: Sequence[dict[str, Any]], elapsed_s: float, stages: int, batch: int,
                target: float = TARGET_EFFICIENCY) -> dict[str, Any]:
    """The run's end: elapsed seconds, parity, and the efficiency target at (`stages`, `batch`)."""
    cell = next((r for r in rows if r.get("row") == "throughput" and r["stages"] == stages and r["batch"] == batch),
                None)
    parity = next((r for r in rows if r.get("row") == "parity"), None)
    eff = cell["efficiency"] if cell else None
    return {"bench": "gpu", "row": "summary", "elapsed_s": elapsed_s,
            "parity_identical": parity["identical"] if parity else None,
            "target": f"S={stages} at batch {batch}: efficiency >= {target}", "efficiency": eff,
            "target_met": None if eff is None else eff >= target,
            "skipped": [_label(r) for r in rows if r.get("row") == "skipped"],
            "errors": [_label(r) for r in rows if r.get("row") == "error"]}


def stage_ms(replicas: Sequence[Sequence[dict[str, Any]]]) -> list[list[float | None]]:
    """Each stage's first replica's measured [compute ms a step, ms its inputs waited]: where a step goes."""
    def r(v: Any) -> float | None:
        return None if v is None else round(float(v), 2)

    return [[r(stage[0].get("compute_ms")), r(stage[0].get("inbound_ms"))] for stage in replicas if stage]


def phases_ms(stages: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Each stage's first replica's step parts, ms (receive, inputs, forward launch, after, sample, send: `StageActor.phase`)."""
    return [dict(p or {}) for p in first_replicas(stages, "phases_ms")]


def first_replicas(stages: Sequence[dict[str, Any]], key: str) -> list[Any]:
    """`key` of each stage's first replica's stats, in stage order."""
    return [s.get(key) for s in sorted(stages, key=lambda s: s.get("stage", 0)) if s.get("replica", 0) == 0]


def measurement_order(stages: Sequence[int], batches: Sequence[int],
                      probe_lanes: bool = False) -> list[tuple[int, list[int], int | None]]:
    """Deployments as (stages, their batches, lanes or None for the default), largest first: the target's
    cell (the most stages at the largest batch) is measured before `budget_s` can run out (a run on a slow
    machine once skipped it). `probe_lanes`: right after it, the same cell with one lane per stage."""
    order: list[tuple[int, list[int], int | None]] = [
        (s, sorted(set(batches), reverse=True), None) for s in sorted(set(stages), reverse=True)]
    top = order[0][0]
    if probe_lanes and top > 1:
        order.insert(1, (top, [max(batches)], top))
    return order


def _label(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={row[k]}" for k in ("what", "stages", "batch") if k in row)


def _best_s(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Best wall seconds of `repeats` calls (the device synchronised around each)."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def machine(device: str) -> dict[str, Any]:
    """What ran it: the GPU's name, torch, CUDA, Ray, Python."""
    import ray
    import torch

    gpu = torch.cuda.get_device_name(0) if device != "cpu" and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "ray": ray.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}


def bench_parity(folder: Path, device: str, new_tokens: int, batch: int = 4, prompt_tokens: int = 8,
                 stages: int = 2, **deploy_options: Any) -> dict[str, Any]:
    """meshpipe's pipeline (float32, `stages` stages sharing the device, `deploy_options` such as
    fuse_linears and cuda_graphs) vs transformers, greedy."""
    import ray
    import torch
    from transformers import LlamaForCausalLM

    from actors import Pipeline
    from actors.bench.pipeline import _wait_for_gpus

    prompts = prompts_for(batch, prompt_tokens, PARITY_SHAPE.vocab)
    free_before = ray.available_resources().get("GPU", 0)
    pipe = Pipeline.deploy(str(folder), num_stages=stages, dtype="float32", name="bench-gpu-parity",
                           stage_resources=stage_resources_for(stages, os.cpu_count() or 1), **deploy_options)
    try:
        got = [c.token_ids for c in pipe.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)]
        used = pipe.describe()["stages"][0]["device"]
        graphs = first_replicas(pipe.stats()["stages"], "cuda_graphs")
    finally:
        pipe.shutdown()
        _wait_for_gpus(free_before)
    hf = LlamaForCausalLM.from_pretrained(str(folder)).to(device=device, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():  # eos_token_id=None: exactly new_tokens, EOS neither stops nor is suppressed
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    want = out[:, prompt_tokens:].tolist()
    del hf
    return parity_row(got, want, stages=stages, dtype="float32", stage_device=used, transformers_device=device,
                      new_tokens=new_tokens, stage_graphs=graphs, **deploy_options)


def bench_gpu(stages: Sequence[int] = (1, 2, 4), batches: Sequence[int] = (1, 16, 64), new_tokens: int = 64,
              prompt_tokens: int = 16, device: str = "cuda", shape: LlamaShape | None = None,
              dtype: str | None = None, repeats: int = 2, parity: bool = True, budget_s: float = 400.0,
              work_dir: str | None = None, actor_baseline: bool = True,
              fuse_linears: bool | None = None, cuda_graphs: bool | None = None,
              micro_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """The rows described above, one Ray session (started here unless one is running).

    `budget_s`: a deployment or batch that would start after this many seconds is skipped (a
    ``skipped`` row), so that the whole run ends within about `budget_s` + one deployment's time. A
    failure becomes an ``error`` row and the run goes on. `fuse_linears`: the stages' and the one-process
    baselines' setting (`Transformer.fuse_linears`; None: the default, fused on a GPU). `cuda_graphs`: the
    stages' (None: the default, on a GPU); the one-process baselines stay eager. `micro_batches`: lanes in
    flight (None: the default, one per GPU the stages occupy).
    """
    import ray
    import torch

    from models import generate_local, load_model, resolve_dtype
    from models.random_checkpoint import save_random_llama

    t_start = time.monotonic()
    shape = shape or default_shape(device)
    dtype = dtype or default_dtype(device)
    torch_dtype = resolve_dtype(dtype, device)  # a ConfigError names the accepted values
    if max(stages) > shape.n_layers:
        raise ValueError(f"{max(stages)} stages need at least as many layers (the shape has {shape.n_layers})")
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    deploy_options: dict[str, Any] = {"fuse_linears": fuse_linears, "cuda_graphs": cuda_graphs,
                                      **({"micro_batches": micro_batches} if micro_batches else {})}

    def emit(row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "elapsed_s": round(time.monotonic() - t_start, 1)}
        rows.append(row)
        log.info("%s", row)
        return row

    try:
        with tempfile.TemporaryDirectory(prefix="meshpipe-bench-gpu-", dir=work_dir) as tmp:
            if parity:
                folder = save_random_llama(Path(tmp) / "parity", **asdict(PARITY_SHAPE), init=PARITY_INIT,
                                           max_seq_len=512, seed=1)
                yield emit(_guarded({"stages": 2, "what": "parity"},
                                    lambda: bench_parity(folder, device, new_tokens=min(new_tokens, 32),
                                                         **deploy_options)))
            t0 = time.perf_counter()
            folder = save_random_llama(Path(tmp) / "model", **asdict(shape), max_seq_len=2048, dtype=torch_dtype)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            model = load_model(folder, dtype=dtype, device=device)
            model.fuse_linears(fuse_linears)
            load_s = time.perf_counter() - t0
            yield emit({"bench": "gpu", "row": "model", **shape.describe(), "dtype": dtype, "write_s": write_s,
                        "load_s": load_s, **deploy_options, "prompt_tokens": prompt_tokens, "repeats": repeats, **machine(device)})
            prompts = {b: prompts_for(b, prompt_tokens, shape.vocab) for b in batches}

            def local(b: int) -> float:
                """One-process seconds at batch b (best of `repeats`)."""
                return _best_s(partial(generate_local, model, prompts[b], new_tokens, ignore_eos=True), repeats,
                               sync)

            for b in batches:  # warm: the first calls at each batch allocate caches, pick kernels
                generate_local(model, prompts[b], new_tokens, ignore_eos=True)

            def over_budget() -> bool:
                return time.monotonic() - t_start > budget_s

            ends = sorted({min(batches), max(batches)})
            yield emit(_guarded({"what": "fused linears"}, lambda: bench_fused(
                model, prompts, ends, new_tokens, repeats, sync, fuse_linears)))
            yield emit(_guarded({"what": "cuda graphs"}, lambda: bench_graphs(
                model, prompts, ends, new_tokens, repeats, sync)))
            if actor_baseline:
                yield emit(_guarded({"what": "one process in an actor"}, lambda: bench_in_actor(
                    folder, dtype, device, ends, prompts, new_tokens, repeats, local, fuse_linears)))
            for s, bs, lanes in measurement_order(stages, batches, probe_lanes=micro_batches is None):
                options = {**deploy_options, **({"micro_batches": lanes} if lanes else {})}
                for row in _deployment(str(folder), s, dtype, bs, prompts, new_tokens, repeats, local, sync,
                                       over_budget, options):
                    yield emit(row)
        yield emit(summary_row(rows, time.monotonic() - t_start, max(stages), max(batches)))
    finally:
        if started:
            ray.shutdown()


def bench_variants(model: Any, prompts: dict[int, list[list[int]]], batches: Sequence[int], new_tokens: int,
                   repeats: int, sync: Callable[[], None], row: str, variants: dict[str, Callable[[], None]],
                   restore: Callable[[], None]) -> dict[str, Any]:
    """ms a step of one process under each of `variants` (name -> a call setting the model up), alternating
    at each batch, and whether their greedy tokens agree; `restore` sets the model back at the end."""
    from models import generate_local

    out: dict[str, Any] = {"bench": "gpu", "row": row, "new_tokens": new_tokens}
    try:
        for b in batches:
            run = partial(generate_local, model, prompts[b], new_tokens, ignore_eos=True)
            best: dict[str, float] = {}
            tokens: dict[str, list[list[int]]] = {}
            for _ in range(2):
                for name, setup in variants.items():
                    setup()
                    tokens[name] = [c.token_ids for c in run()]  # warm: fusing, capturing happen at first steps
                    best[name] = min(best.get(name, float("inf")), _best_s(run, repeats, sync))
            out[f"batch_{b}_ms_per_step"] = {k: round(v * 1e3 / new_tokens, 2) for k, v in best.items()}
            out[f"batch_{b}_same_tokens"] = all(t == tokens[next(iter(tokens))] for t in tokens.values())
    finally:
        restore()
    return out


def bench_fused(model: Any, prompts: dict[int, list[list[int]]], batches: Sequence[int], new_tokens: int,
                repeats: int, sync: Callable[[], None], restore: bool | None = None) -> dict[str, Any]:
    """One process with each layer's q|k|v and gate|up matmuls separate and fused (`Transformer.fuse_linears`);
    the model is left at `restore`."""
    return bench_variants(model, prompts, batches, new_tokens, repeats, sync, "fused_linears",
                          {"separate": partial(model.fuse_linears, False), "fused": partial(model.fuse_linears, True)},
                          partial(model.fuse_linears, restore))


def bench_graphs(model: Any, prompts: dict[int, list[list[int]]], batches: Sequence[int], new_tokens: int,
                 repeats: int, sync: Callable[[], None]) -> dict[str, Any]:
    """One process eager and with its decode steps as CUDA graphs (`Transformer.cuda_graphs`): what graphs
    give without a pipeline (the throughput rows' baseline stays eager); the model is left eager."""
    stats: dict[str, Any] = {}

    def restore() -> None:
        stats.update(model.graphs.stats() if model.graphs is not None else {})
        model.cuda_graphs(False)

    out = bench_variants(model, prompts, batches, new_tokens, repeats, sync, "cuda_graphs",
                         {"eager": partial(model.cuda_graphs, False), "graphs": partial(model.cuda_graphs, True)}, restore)
    return {**out, "graphs": stats}


class LocalInActor:
    """`generate_local` in a Ray worker process on the same GPU: the one-process baseline where a stage
    runs, called from the actor's task thread or from a thread of its own (as a stage computes)."""

    def __init__(self, folder: str, dtype: str, device: str, fuse_linears: bool | None = None) -> None:
        from models import load_model

        self.device = device
        self.model = load_model(folder, dtype=dtype, device=device)
        self.model.fuse_linears(fuse_linears)

    def best_s(self, prompts: list[list[int]], new_tokens: int, repeats: int, own_thread: bool) -> float:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from models import generate_local

        sync = torch.cuda.synchronize if self.device != "cpu" else (lambda: None)
        run = partial(generate_local, self.model, prompts, new_tokens, ignore_eos=True)
        if not own_thread:
            run()  # warm
            return _best_s(run, repeats, sync)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(run).result()
            return pool.submit(_best_s, run, repeats, sync).result()


def bench_in_actor(folder: Path, dtype: str, device: str, batches: Sequence[int], prompts: dict[int, list[list[int]]],
                   new_tokens: int, repeats: int, local: Callable[[int], float],
                   fuse_linears: bool | None = None) -> dict[str, Any]:
    """ms a step of one process in this driver, in an actor's task thread and in an actor's own thread,
    alternating at each batch: whether a Ray worker process alone makes the same steps slower."""
    import ray

    from actors.bench.pipeline import _wait_for_gpus

    free_before = ray.available_resources().get("GPU", 0)
    actor = ray.remote(num_gpus=1, num_cpus=0)(LocalInActor).remote(str(folder), dtype, device, fuse_linears)
    out: dict[str, Any] = {"bench": "gpu", "row": "one_process_in_actor", "new_tokens": new_tokens}
    try:
        ray.get(actor.__ray_ready__.remote())  # its start (imports, loading) must not overlap the driver's timing
        for b in batches:
            driver_s = local(b)
            main_s = ray.get(actor.best_s.remote(prompts[b], new_tokens, repeats, False))
            thread_s = ray.get(actor.best_s.remote(prompts[b], new_tokens, repeats, True))
            out[f"batch_{b}_ms_per_step"] = {k: round(v * 1e3 / new_tokens, 2) for k, v in
                                             (("driver", driver_s), ("actor", main_s), ("actor_own_thread", thread_s))}
    finally:
        ray.kill(actor)
        _wait_for_gpus(free_before)
    return out


def _guarded(what: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`fn()`'s row, or an ``error`` row: one failure must not cost the rest of a run-once benchmark."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported as a row, logged with its traceback
        log.exception("bench gpu: %s failed", what)
        return {"bench": "gpu", "row": "error", **what, "error": f"{type(e).__name__}: {e}"[:1000]}


def _deployment(folder: str, stages: int, dtype: str, batches: Sequence[int], prompts: dict[int, list[list[int]]],
                new_tokens: int, repeats: int, local: Callable[[int], float], sync: Callable[[], None],
                over_budget: Callable[[], bool], deploy_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """One deployment of `stages` stage actors sharing the GPU (`deploy_options`: fuse_linears, cuda_graphs, micro_batches):
    a throughput row per batch (or why not)."""
    import ray

    from actors import Pipeline
    from actors.bench.pipeline import _wait_for_gpus

    if over_budget():
        yield {"bench": "gpu", "row": "skipped", "stages": stages, "reason": "time budget spent"}
        return
    free_before = ray.available_resources().get("GPU", 0)
    t0 = time.perf_counter()
    try:
        lanes = (deploy_options or {}).get("micro_batches")
        pipe = Pipeline.deploy(folder, num_stages=stages, dtype=dtype,
                               name=f"bench-gpu-{stages}" + (f"-lanes-{lanes}" if lanes else ""),
                               stage_resources=stage_resources_for(stages, os.cpu_count() or 1), **(deploy_options or {}))
    except Exception as e:  # noqa: BLE001 - reported as a row
        log.exception("bench gpu: deploying %d stages failed", stages)
        yield {"bench": "gpu", "row": "error", "stages": stages, "what": "deploy",
               "error": f"{type(e).__name__}: {e}"[:1000]}
        _wait_for_gpus(free_before)
        return
    deploy_s = time.perf_counter() - t0
    try:
        info = pipe.describe()
        for b in batches:
            if over_budget():
                yield {"bench": "gpu", "row": "skipped", "stages": stages, "batch": b, "reason": "time budget spent"}
                continue

            def measure(b: int = b) -> dict[str, Any]:
                run = partial(pipe.generate, prompts[b], max_new_tokens=new_tokens, ignore_eos=True)
                local_s = local(b)  # beside it, the deployment idle
                run()  # warm
                best = _best_s(run, repeats, sync)
                return throughput_row(stages, b, new_tokens, best, local_s, deploy_s=deploy_s,
                                      stage_device=info["stages"][0]["device"],
                                      micro_batches=info.get("router", {}).get("micro_batches"),
                                      stage_ms=stage_ms(pipe.stats()["router"]["replicas"]),
                                      phases_ms=phases_ms(pipe.stats()["stages"]),
                                      cuda_graphs=first_replicas(pipe.stats()["stages"], "cuda_graphs"))

            yield _guarded({"stages": stages, "batch": b, "what": "generate"}, measure)
    finally:
        pipe.shutdown()
        _wait_for_gpus(free_before)
