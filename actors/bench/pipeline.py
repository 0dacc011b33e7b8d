"""Benchmarks: pipeline efficiency against the single-process model, and hop costs.

`bench_pipeline` yields one JSON-able dict per measurement, all taken in one process and one Ray
session so that every figure has its baseline from the same run. Each dict has a ``"bench"`` key:

- ``single_process``: the same network in this process (`models.load_model`), every core; once
  at the start, then again right before each deployment's timing at each batch (``next_to``).
- ``transformers``: transformers' `LlamaForCausalLM.generate` on the same weights (when installed).
- ``pipeline``: `Pipeline.generate` over S stage actors; ``efficiency`` = its tokens/s ÷ the
  single-process tokens/s at the same batch, measured next to it (the machine is shared: figures
  taken minutes apart drift), and ``efficiency_vs_first_baseline``.
- ``hop_meshpipe_derived``: (pipeline ms/step - single-process ms/step) / S, for the largest S.
- ``hop_bare``: a chain of bare Ray actors, each returning its input (`ref = a.f.remote(ref)`),
  torch tensor or numpy payload.
- ``hop_envelope``: the same chain passing an `Envelope` and returning a new one, router-chained
  and in push mode (meshpipe's stage hop without the layers).
- ``hop_push``: push mode, actor i calling actor i+1 itself (returning the ObjectRef, or awaiting
  it and returning the value).

Timings are wall-clock; each is the best of ``repeats`` runs (the median is reported too).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from actors.bench.plain import PlainRing, plain_row

log = logging.getLogger(__name__)

RAW_PROMPT = "The capital of France is"
SMALL_SHAPE = (1, 576)  # one token's hidden state in SmolLM2-135M
LARGE_SHAPE = (5472, 576)  # 12.6 MB of fp32
PUSH_MODE = "push: actor i calls actor i+1, returns its ObjectRef; caller chases refs"


def machine() -> dict[str, Any]:
    import ray

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "zero_copy": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "0") not in ("", "0"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _runnable() -> int | None:
    """Threads runnable right now, machine-wide (Linux; /proc/loadavg's 4th field), this one included."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_wait_s: float = 30.0, samples: int = 6) -> float:
    """Waits until at most one thread is runnable in `samples` samples in a row (0.5 s apart), or
    `max_wait_s`; returns the seconds waited. Ray's start (worker prestart, agents) costs seconds of
    CPU, and a 2-thread torch job on 2 cores slows down several-fold beside any busy process."""
    t0 = time.monotonic()
    quiet = 0
    while quiet < samples and time.monotonic() - t0 < max_wait_s:
        r = _runnable()
        if r is None:
            break
        quiet = quiet + 1 if r <= 1 else 0
        time.sleep(0.5)
    return time.monotonic() - t0


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _as_list(v: int | Sequence[int] | None) -> list[int | None]:
    if v is None:
        return [None]
    if isinstance(v, int):
        return [v]
    return list(v) or [None]


def _prompt_ids(model: Any) -> list[int]:
    tok = getattr(model, "tokenizer", None)
    return tok.encode(RAW_PROMPT) if tok is not None else list(range(1, 9))


# --------------------------------------------------------------------------- baselines


def bench_single_process(model: Any, prompt: list[int], batches: Sequence[int], new_tokens: int,
                         repeats: int) -> Iterator[dict]:
    """The theoretical rate: the whole network in this process, every core, no communication."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    for b in batches:
        prompts = [prompt] * b
        model.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)  # warm-up
        best, med = _timed(lambda: model.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True),
                           repeats)
        yield {"bench": "single_process", "batch": b, "new_tokens": new_tokens, "threads": threads,
               "ms_per_step": best / new_tokens * 1e3, "ms_per_step_median": med / new_tokens * 1e3,
               "tokens_per_s": b * new_tokens / best, "load1": _load1()}


def bench_transformers(source: Any, prompt: list[int], batches: Sequence[int], new_tokens: int,
                       repeats: int, reference: list[int] | None = None) -> Iterator[dict]:
    """transformers' generate on the same weights (greedy, exactly `new_tokens` tokens)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if source.is_file():  # a GGUF: transformers dequantises it to fp32
        hf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hf.eval()
    load_s = time.perf_counter() - t0
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    eos = hf.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    for b in batches:
        ids = torch.tensor([prompt] * b)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad)

        def run(n: int) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

        run(new_tokens)  # warm-up
        best, med = _timed(lambda: run(new_tokens), repeats)
        row = {"bench": "transformers", "batch": b, "new_tokens": new_tokens, "threads": threads,
               "ms_per_step": best / new_tokens * 1e3, "ms_per_step_median": med / new_tokens * 1e3,
               "tokens_per_s": b * new_tokens / best, "load_s": round(load_s, 1), "load1": _load1()}
        if reference is not None and b == 1:
            # min_new_tokens forbids EOS where ignore_eos lets it through: compare up to the first EOS.
            eos_ids = set(eos if isinstance(eos, list) else [eos])
            k = next((i for i, tok in enumerate(reference) if tok in eos_ids), len(reference))
            got = run(new_tokens)[0, len(prompt):][:k].tolist()
            row["same_greedy_tokens_as_meshpipe_until_eos"] = got == reference[:k]
            row["compared_tokens"] = k
        yield row
    del hf


# --------------------------------------------------------------------------- pipeline


def bench_deployment(model: str, stages: int, batches: Sequence[int], new_tokens: int, prompt: list[int],
                     threads: int | None, micro_batches: int | None, repeats: int,
                     baseline: Callable[[int], dict] | None = None, hop_mode: str | None = None,
                     first: dict[int, dict] | None = None, extra: dict[str, Any] | None = None,
                     plain: Callable[[int], dict] | None = None) -> Iterator[dict]:
    """One deployment of `stages` stages: warm up, then time `generate` at every batch size.

    `baseline(b)` measures the single-process model at batch b: it runs right before the
    pipeline's timing at that batch (deployment idle), so `efficiency` compares two figures taken
    under the same conditions; its row is yielded too. `first`: the run's first baselines, for
    `efficiency_vs_first_baseline`. `extra`: more deploy options (e.g. codec), echoed in each row.
    `plain(b)`: the same stages as plain processes (`actors.bench.plain`), timed after the baseline.
    """
    import ray

    from actors.pipeline import Pipeline

    name = f"bench-{stages}-t{threads or 'auto'}-m{micro_batches or 'auto'}-{hop_mode or 'auto'}"
    name += "".join(f"-{(extra or {}).get(k)}" for k in ("codec", "compress", "encryption") if (extra or {}).get(k))
    name += f"-spin{(extra or {})['omp_spin_count']}" if "omp_spin_count" in (extra or {}) else ""
    free_before = ray.available_resources().get("GPU", 0)
    options: dict[str, Any] = {"hop_mode": hop_mode} if hop_mode else {}
    options.update(extra or {})
    t0 = time.perf_counter()
    pipe = Pipeline.deploy(model, num_stages=stages, name=name, threads_per_stage=threads,
                           micro_batches=micro_batches, **options)
    deploy_s = time.perf_counter() - t0
    try:
        info = pipe.describe()
        used_threads = "auto" if info["stages"][0].get("threads_adaptive") else info["stages"][0]["threads"]
        used_micro = info["router"]["micro_batches"]
        used_mode = info["router"].get("hop_mode")
        data_path = info["router"].get("data_path")
        for b in batches:
            single = bare = None
            if baseline is not None:
                single = {**baseline(b), "next_to": name}
                yield single
            if plain is not None:
                bare = {**plain(b), "next_to": name}
                if single is not None:
                    bare["efficiency"] = bare["tokens_per_s"] / single["tokens_per_s"]
                yield bare
            prompts = [prompt] * b
            pipe.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)  # warm-up
            busy = sum(st["busy_s"] for st in pipe.stats()["stages"])
            best, med = _timed(lambda: pipe.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True),
                               repeats)
            # time spent inside the stages (compute, encode, send) per step, summed over the stages
            inside = (sum(st["busy_s"] for st in pipe.stats()["stages"]) - busy) / (repeats * new_tokens) * 1e3
            ms = best / new_tokens * 1e3
            tps = b * new_tokens / best
            row = {"bench": "pipeline", "stages": stages, "batch": b, "new_tokens": new_tokens,
                   "threads_per_stage": used_threads, "micro_batches": used_micro, "hop_mode": used_mode,
                   "data_path": data_path, "stages_busy_ms_per_step": inside, "ms_per_step": ms, "ms_per_step_median": med / new_tokens * 1e3, "tokens_per_s": tps,
                   "deploy_s": round(deploy_s, 1), "load1": _load1(),
                   **{k: v for k, v in (extra or {}).items() if k != "encryption_key"}}
            if single is not None:
                row["single_process_ms_per_step"] = single["ms_per_step"]
                row["efficiency"] = tps / single["tokens_per_s"]
                row["overhead_ms_per_step"] = ms - single["ms_per_step"]
            if first and b in first:
                row["efficiency_vs_first_baseline"] = tps / first[b]["tokens_per_s"]
            if bare is not None:  # the pipeline against its stages with nothing between them
                row["plain_processes_ms_per_step"] = bare["ms_per_step"]
                row["vs_plain_processes"] = tps / bare["tokens_per_s"]
            yield row
    finally:
        pipe.shutdown()
        _wait_for_gpus(free_before)


def _wait_for_gpus(free: float, timeout_s: float = 60.0) -> None:
    """`Pipeline.shutdown` kills actors asynchronously: wait until `free` GPUs are free again."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) < free:
        if time.monotonic() > deadline:
            log.warning("GPUs of the last deployment still not free after %.0f s", timeout_s)
            return
        time.sleep(0.2)


# --------------------------------------------------------------------------- hops


class EchoActor:
    """A bare actor for hop measurements: returns what it gets, or passes it on itself."""

    def f(self, x: Any) -> Any:
        return x

    def envelope(self, env: Any) -> Any:
        """What a stage does with its message, minus the layers: payload in, new Envelope out."""
        return _next_envelope(env)

    def push(self, x: Any, rest: list) -> Any:
        """Push mode: call the next actor and return its ObjectRef (the caller chases the refs)."""
        if not rest:
            return x
        return rest[0].push.remote(x, rest[1:])

    def push_envelope(self, env: Any, rest: list) -> Any:
        """Push mode with envelopes, as `StageActor.forward` does it."""
        out = _next_envelope(env)
        if not rest:
            return out
        return rest[0].push_envelope.remote(out, rest[1:])


def _next_envelope(env: Any) -> Any:
    """Verify and decode the message, then encode the same tensor into a new one (codec none)."""
    from dataclasses import replace

    from actors.wire import Envelope, LinkCodec

    header, x = env.open(None)
    return Envelope.seal(replace(header, sender="echo"), x, LinkCodec(), None, params=env.params)


class AsyncEchoActor:
    """Push mode where each actor awaits the next one and returns the value back up the chain."""

    async def push(self, x: Any, rest: list) -> Any:
        if not rest:
            return x
        return await rest[0].push.remote(x, rest[1:])


def _chase(ref: Any) -> Any:
    import ray

    out = ray.get(ref)
    while isinstance(out, ray.ObjectRef):
        out = ray.get(out)
    return out


def bench_hops(n_actors: int = 4, iters_small: int = 50, iters_large: int = 8) -> Iterator[dict]:
    """Per-hop cost of a chain of `n_actors` actors (ms per hop = chain time / n_actors).

    bare: torch tensor and numpy array (meshpipe's payload type), router-chained and push mode;
    envelope: an `Envelope` carrying the payload, router-chained (meshpipe's default) and push mode.
    """
    import ray

    from actors.wire import Envelope, Header, LinkCodec
    from models.sampling import SamplingParams

    opts = dict(num_cpus=0, num_gpus=0)
    echo = [ray.remote(EchoActor).options(**opts).remote() for _ in range(n_actors)]
    aecho = [ray.remote(AsyncEchoActor).options(**opts).remote() for _ in range(n_actors)]
    ray.get([a.f.remote(None) for a in echo] + [a.push.remote(None, []) for a in aecho])

    def router_chain(method: str, x: Any) -> Callable[[], Any]:
        def run() -> Any:
            ref = ray.put(x)
            for a in echo:
                ref = getattr(a, method).remote(ref)
            return ray.get(ref)
        return run

    try:
        for label, shape, iters in (("small", SMALL_SHAPE, iters_small), ("large", LARGE_SHAPE, iters_large)):
            t = torch.randn(shape)
            base = {"n_actors": n_actors, "shape": list(shape), "bytes": t.numel() * t.element_size(),
                    "size": label}
            header = Header(kind="step", step=1, msg_id=1, attempt=0, sender="bench", seq_ids=["bench-0"],
                            starts=[16], lengths=[shape[0]], release=[])
            env = penv = Envelope.seal(header, t, LinkCodec(), None, params=[SamplingParams()])
            cases = [
                ("hop_bare", "torch", "router-chained: ref = a.f.remote(ref), each returns its input",
                 router_chain("f", t)),
                ("hop_bare", "numpy", "router-chained: ref = a.f.remote(ref), each returns its input",
                 router_chain("f", t.numpy())),
                ("hop_push", "torch", PUSH_MODE,
                 lambda: _chase(echo[0].push.remote(t, echo[1:]))),
                ("hop_push", "numpy", PUSH_MODE,
                 lambda: _chase(echo[0].push.remote(t.numpy(), echo[1:]))),
                ("hop_push", "torch", "push: async actor i awaits actor i+1, returns the value back up",
                 lambda: ray.get(aecho[0].push.remote(t, aecho[1:]))),
                ("hop_envelope", "envelope", "router-chained: Envelope in, verify + decode -> tensor -> "
                 "encode + checksum -> new one out (codec none)",
                 router_chain("envelope", env)),
                ("hop_envelope", "envelope", "push (hop_mode='push'): as above, actor i calls actor i+1 "
                 "and returns its ObjectRef; caller chases refs",
                 lambda: _chase(echo[0].push_envelope.remote(penv, echo[1:]))),
            ]
            bare: dict[str, float] = {}
            for bench, payload, mode, fn in cases:
                fn()  # warm-up
                best, med = _timed(fn, iters)
                row = {"bench": bench, **base, "payload": payload, "mode": mode,
                       "ms_per_hop": best / n_actors * 1e3, "ms_per_hop_median": med / n_actors * 1e3}
                if bench == "hop_bare":
                    bare[payload] = best
                else:
                    ref = bare["numpy" if payload == "envelope" else payload]
                    row["vs_bare_router_chained"] = best / ref
                    row["vs_bare_of"] = "numpy" if payload == "envelope" else payload
                yield {**row, "load1": _load1()}
    finally:
        for a in echo + aecho:
            ray.kill(a)


# --------------------------------------------------------------------------- everything


def bench_pipeline(
    stages: Sequence[int] = (1, 2, 4),
    batches: Sequence[int] = (1, 16),
    new_tokens: int = 32,
    model: str = "smollm2-135m",
    threads: int | Sequence[int] | None = None,
    micro_batches: int | Sequence[int] | None = None,
    *,
    hop_modes: str | Sequence[str] | None = None,
    repeats: int = 2,
    with_transformers: bool = True,
    hops: bool = True,
    spin_counts: Sequence[int | None] | None = None,
    plain: bool = False,
) -> Iterator[dict]:
    """All measurements in one process and one Ray session; one dict per measurement.

    `threads`, `micro_batches` and `hop_modes` ("push", "router") may be lists: every stage count
    is deployed once per combination (None = the pipeline's default); a single stage has nothing
    to pipeline, so S=1 only sweeps `threads` (with the first micro-batch count and hop mode).
    `spin_counts`: deploy once per stages' `omp_spin_count` too (None in it: OpenMP's own default).
    `plain`: at each S > 1, the same stages as plain processes over pipes too (`actors.bench.plain`),
    timed beside each pipeline figure. Starts a local Ray when none is running (and shuts it down at the end).
    """
    import ray

    from models import load_model
    from models.loading import resolve_source

    source = resolve_source(model)
    info = machine()
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=max(max(stages), 1),
                 include_dashboard=False, log_to_driver=False)
        started = True
    try:
        waited = wait_quiet()
        ref_model = load_model(source)
        prompt = _prompt_ids(ref_model)
        first: dict[int, dict] = {}
        for row in bench_single_process(ref_model, prompt, batches, new_tokens, 2 * repeats):
            first[row["batch"]] = row
            yield {**row, "model": model, "prompt_tokens": len(prompt), "quiet_wait_s": round(waited, 1),
                   "machine": info}
        reference = ref_model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)[0].token_ids
        if with_transformers:
            try:
                import transformers  # noqa: F401
            except ImportError:
                log.info("transformers is not installed: no transformers baseline")
            else:
                for row in bench_transformers(source, prompt, batches, new_tokens, repeats, reference):
                    yield {**row, "model": model, "machine": info}

        def baseline(b: int) -> dict:
            row = next(bench_single_process(ref_model, prompt, [b], new_tokens, repeats + 1))
            return {**row, "model": model, "machine": info}

        last = max(stages)
        modes = [hop_modes] if isinstance(hop_modes, str) else list(hop_modes or [None])
        for s in stages:
            ring = PlainRing(str(source), s) if plain and s > 1 else None
            try:
                for row in _deployments(model, s, batches, new_tokens, prompt, threads, micro_batches, modes,
                                        spin_counts, repeats, baseline, first, ring, reference):
                    yield {**row, "model": model, "machine": info}
                    if row["bench"] == "pipeline" and s == last and s > 1 and "overhead_ms_per_step" in row:
                        yield {"bench": "hop_meshpipe_derived", "stages": s, "batch": row["batch"],
                               "threads_per_stage": row["threads_per_stage"],
                               "micro_batches": row["micro_batches"], "hop_mode": row["hop_mode"],
                               "how": "(pipeline ms/step - single-process ms/step next to it) / stages",
                               "ms_per_hop": row["overhead_ms_per_step"] / s, "model": model,
                               "load1": row["load1"], "machine": info}
            finally:
                if ring is not None:
                    ring.close()
        del ref_model
        if hops:
            for row in bench_hops():
                yield {**row, "machine": info}
    finally:
        if started:
            ray.shutdown()


def _deployments(model: str, s: int, batches: Sequence[int], new_tokens: int, prompt: list[int],
                 threads: int | Sequence[int] | None, micro_batches: int | Sequence[int] | None,
                 modes: list[str | None], spin_counts: Sequence[int | None] | None, repeats: int,
                 baseline: Callable[[int], dict], first: dict[int, dict], ring: PlainRing | None,
                 reference: list[int]) -> Iterator[dict]:
    """`bench_deployment` once per combination of the sweeps at S = `s` (S = 1 sweeps threads only)."""
    micros = _as_list(micro_batches)
    configs = [(t, m, h) for t in _as_list(threads)
               for m in (micros if s > 1 else micros[:1]) for h in (modes if s > 1 else modes[:1])]
    spins = [{}] if spin_counts is None else [{"omp_spin_count": n} for n in spin_counts]
    bare = None if ring is None else (lambda b: plain_row(ring, prompt, b, new_tokens, repeats, reference))
    for (t, m, h), spin in [(c, sp) for c in configs for sp in spins]:
        yield from bench_deployment(model, s, batches, new_tokens, prompt, t, m, repeats, baseline, h, first,
                                    extra=spin, plain=bare)


# --------------------------------------------------------------------------- codecs end to end

COMBINED_SETUPS: list[dict[str, Any]] = [  # after one setup per registered codec
    {"codec": "none", "compress": "lz4"}, {"codec": "none", "compress": "zstd"},
    {"codec": "int8", "compress": "zstd"}, {"codec": "none", "encryption": "always"},
]


def codec_setups() -> list[dict[str, Any]]:
    """The end-to-end setups: each registered codec alone, then COMBINED_SETUPS."""
    from actors.wire import codec_names

    return [{"codec": c} for c in codec_names()] + [dict(s) for s in COMBINED_SETUPS]


def setup_label(setup: dict[str, Any]) -> str:
    """'int8+zstd', 'none+encrypted', ... for the CLI and the rows."""
    label = setup["codec"] + (f"+{setup['compress']}" if setup.get("compress") else "")
    return label + ("+encrypted" if setup.get("encryption") == "always" else "")


def bench_codec_pipeline(model: str = "smollm2-135m", stages: int = 2, batches: Sequence[int] = (1, 16),
                         new_tokens: int = 32, repeats: int = 2,
                         setups: Sequence[dict[str, Any]] | None = None) -> Iterator[dict]:
    """End-to-end tokens/s of one deployment per codec setup (default: `codec_setups()`); `vs_none`
    against codec none in this run."""
    from actors.wire import new_key
    from models.loading import resolve_source
    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_source(model))
    prompt = tok.encode(RAW_PROMPT) if tok is not None else list(range(1, 9))
    ref: dict[int, float] = {}
    for setup in codec_setups() if setups is None else setups:
        extra = dict(setup)
        if extra.get("encryption") == "always":
            extra["encryption_key"] = new_key()
        wait_quiet()
        for row in bench_deployment(model, stages, batches, new_tokens, prompt, None, None, repeats, extra=extra):
            row["bench"] = "codec_pipeline"
            row["setup"] = setup_label(setup)
            row.setdefault("compress", None)
            if setup == {"codec": "none"}:
                ref[row["batch"]] = row["tokens_per_s"]
            if row["batch"] in ref:
                row["vs_none"] = row["tokens_per_s"] / ref[row["batch"]]
            yield row
