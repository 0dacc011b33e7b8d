"""The `meshpipe bench` sub-app: one JSON line per measurement on stdout (README: Performance)."""

from __future__ import annotations

from typing import Annotated

import typer

from actors.cli_helpers import _emit, _ensure_model, _handles_errors, _parse_ints
from models.sources import SMOLLM2_NAME

bench_app = typer.Typer(help="Benchmarks (README: Performance); one JSON line per measurement on stdout.",
                        no_args_is_help=True)


@bench_app.command("pipeline")
@_handles_errors
def bench_pipeline_cmd(
    stages: Annotated[str, typer.Option(help="Stage counts, comma-separated.")] = "1,2,4",
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,16",
    new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    model: Annotated[str, typer.Option()] = SMOLLM2_NAME,
    threads: Annotated[str | None, typer.Option(
        help="Torch threads per stage, comma-separated (default: the pipeline's).")] = None,
    micro_batches: Annotated[str | None, typer.Option(
        help="Micro-batches in flight, comma-separated (default: the pipeline's).")] = None,
    hop_modes: Annotated[str | None, typer.Option(
        help="Hop modes, comma-separated: push, router (default: the pipeline's).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per figure (the best is reported).")] = 2,
    with_transformers: Annotated[bool, typer.Option("--transformers/--no-transformers")] = True,
    hops: Annotated[bool, typer.Option("--hops/--no-hops")] = True,
    omp_spin_counts: Annotated[str | None, typer.Option(
        help="Stages' OpenMP spin counts to compare, comma-separated; 'openmp': OpenMP's own default "
             "(default: the pipeline's).")] = None,
    plain: Annotated[bool, typer.Option("--plain/--no-plain", help=(
        "At each S > 1, the same stages as plain processes over pipes too (no Ray): the bound of any "
        "process-per-stage pipeline here."))] = False,
) -> None:
    """Pipeline efficiency vs the single-process model, and hop costs (bare, envelope, push)."""
    import ray

    from actors.bench.pipeline import bench_pipeline

    stage_list = _parse_ints(stages, "--stages") or [1, 2, 4]
    batch_list = _parse_ints(batches, "--batches") or [1, 16]
    modes = [m.strip() for m in hop_modes.split(",") if m.strip()] if hop_modes else None
    if modes and not set(modes) <= {"push", "router"}:
        raise typer.BadParameter(f"{hop_modes!r}: give push, router or both", param_hint="--hop-modes")
    spins = None
    if omp_spin_counts:
        words = [w.strip() for w in omp_spin_counts.split(",") if w.strip()]
        if not all(w == "openmp" or w.isdigit() for w in words):
            raise typer.BadParameter(f"{omp_spin_counts!r}: give counts >= 0 or 'openmp'",
                                     param_hint="--omp-spin-counts")
        spins = [None if w == "openmp" else int(w) for w in words]
    ray.init(address="local", num_gpus=max(stage_list), log_to_driver=False, include_dashboard=False)
    try:
        rows = bench_pipeline(stage_list, batch_list, new_tokens, model, _parse_ints(threads, "--threads"),
                              _parse_ints(micro_batches, "--micro-batches"), hop_modes=modes,
                              repeats=repeats, with_transformers=with_transformers, hops=hops,
                              spin_counts=spins, plain=plain)
        _emit(rows)
    finally:
        ray.shutdown()


@bench_app.command("planner")
@_handles_errors
def bench_planner_cmd(
    sizes: Annotated[str, typer.Option(help="Total replicas, comma-separated.")] = "32,100,1000,3000,10000",
    stages: Annotated[int, typer.Option(min=1)] = 32,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    nx_max: Annotated[int, typer.Option(help="Largest size to run networkx over every replica pair.")] = 3000,
) -> None:
    """Route planning time vs size: the host-grouped DP against greedy, A* and networkx (no Ray)."""
    from actors.bench.planner import bench_planner
    from actors.errors import topology_errors

    with topology_errors():
        _emit(bench_planner(_parse_ints(sizes, "--sizes") or [32], num_stages=stages, repeats=repeats,
                            nx_max=nx_max))


@bench_app.command("placement")
@_handles_errors
def bench_placement_cmd(seed: Annotated[int, typer.Option()] = 0) -> None:
    """Layer placement DP over heterogeneous GPUs against brute force, and realistic clusters (no Ray)."""
    from actors.bench.placement import bench_placement

    _emit(bench_placement(seed))


@bench_app.command("simulate")
@_handles_errors
def bench_simulate_cmd(
    gpus: Annotated[int, typer.Option(min=1)] = 1000,
    regions: Annotated[int, typer.Option(min=1)] = 3,
    stages: Annotated[int, typer.Option(min=1)] = 8,
    requests: Annotated[int, typer.Option(min=1)] = 2000,
    rate: Annotated[float | None, typer.Option(help="Arrivals a second (default: a fixed share of capacity).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    policies: Annotated[str, typer.Option(help="Comma-separated: shortest, shortest_static, random, "
                                               "round_robin.")] = "shortest,random,round_robin",
) -> None:
    """Discrete-event simulation: shortest-path routing vs random vs round-robin (no Ray)."""
    from actors.errors import topology_errors
    from topology.simulator import bench_simulator

    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    with topology_errors():
        _emit(bench_simulator(gpus, regions, stages, requests, rate, seed, chosen))


@bench_app.command("calibrate")
@_handles_errors
def bench_calibrate_cmd() -> None:
    """A real 3-node run (2 stages x 2 replicas, a slow link) and its simulator replay, fitted on one mix."""
    from actors.bench.calibrate import bench_calibrate

    _emit(bench_calibrate())


@bench_app.command("overhead")
@_handles_errors
def bench_overhead_cmd(
    stages: Annotated[str, typer.Option(help="Stage counts.")] = "1,2,4",
    new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    smollm2: Annotated[bool, typer.Option("--smollm2/--no-smollm2",
                                          help="Then SmolLM2's efficiency at S=2,4, batch 1 and 16.")] = True,
) -> None:
    """Per-token control overhead: a tiny 8-layer model through the pipeline vs in one process; then the
    SmolLM2 efficiency table (pipeline tokens/s over one process's, measured next to it, and the same
    stages as plain processes over pipes: this machine's bound for any process-per-stage pipeline), in one run."""
    import ray

    from actors.bench.overhead import bench_overhead
    from actors.bench.pipeline import bench_pipeline

    stage_list = _parse_ints(stages, "--stages") or [1, 2, 4]
    if smollm2:
        _ensure_model(SMOLLM2_NAME)
    ray.init(address="local", num_gpus=max(stage_list), log_to_driver=False, include_dashboard=False)
    try:
        _emit(bench_overhead(stage_list, new_tokens=new_tokens, repeats=repeats))
        if smollm2:
            _emit(bench_pipeline([s for s in stage_list if s > 1] or [2], [1, 16], 32, SMOLLM2_NAME,
                                 repeats=2, with_transformers=False, hops=False, plain=True))
    finally:
        ray.shutdown()


@bench_app.command("spec")
@_handles_errors
def bench_spec_cmd(
    stages: Annotated[int, typer.Option(min=1)] = 4,
    new_tokens: Annotated[int, typer.Option(min=1)] = 160,
    k: Annotated[int, typer.Option(min=1, max=16, help="Drafts a pass.")] = 4,
    repeats: Annotated[int, typer.Option(min=1)] = 2,
    draft_model: Annotated[str | None, typer.Option(
        help="Draft from this model (same tokenizer as SmolLM2) instead of prompt lookup.")] = None,
) -> None:
    """Speculative decoding through the pipeline: a "Repeat exactly" prompt and a story, with and without drafts."""
    from actors.bench.spec import bench_spec

    _ensure_model(SMOLLM2_NAME)
    _emit(bench_spec(SMOLLM2_NAME, stages, new_tokens, k, repeats, draft_model=draft_model))


@bench_app.command("prefix")
@_handles_errors
def bench_prefix_cmd(
    stages: Annotated[int, typer.Option(min=1)] = 2,
    system_tokens: Annotated[int, typer.Option(min=16, help="Tokens of the shared system prompt.")] = 1000,
    requests: Annotated[int, typer.Option(min=1, help="Timed requests after the first.")] = 5,
    long_tokens: Annotated[int, typer.Option(min=16, help="Tokens of the long prompt.")] = 4000,
    chunk: Annotated[int, typer.Option(min=1, help="prefill_chunk of the chunked run.")] = 512,
) -> None:
    """Prefix caching (time to first token with and without), multi-turn chat over 2 replicas per stage,
    and chunked prefill (other streams' gaps during a long prompt), each beside its baseline."""
    from actors.bench.prefix import bench_prefix

    _ensure_model(SMOLLM2_NAME)
    _emit(bench_prefix(SMOLLM2_NAME, stages, system_tokens, requests, long_tokens, chunk))


@bench_app.command("train")
@_handles_errors
def bench_train_cmd(
    model: Annotated[str, typer.Option()] = SMOLLM2_NAME,
    stages: Annotated[int, typer.Option(min=1)] = 2,
    copies: Annotated[str, typer.Option(help="Data-parallel copies, comma-separated.")] = "1,2",
    micro_batches: Annotated[int, typer.Option(min=1, help="Micro-batches a copy, a step.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps (after one warm-up).")] = 3,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seq_len: Annotated[int, typer.Option(min=2)] = 64,
    lora_r: Annotated[int, typer.Option(min=0, help="LoRA rank (0: every weight trains).")] = 0,
) -> None:
    """Training tokens/s through the stage actors (S x D) beside one process, and the bubble fraction."""
    import ray

    from actors.bench.train import bench_train

    if model == SMOLLM2_NAME:
        _ensure_model(model)
    counts = _parse_ints(copies, "--copies") or [1, 2]
    ray.init(address="local", num_gpus=stages * max(counts), log_to_driver=False, include_dashboard=False)
    try:
        lora = {"r": lora_r, "alpha": 2.0 * lora_r} if lora_r else None
        _emit(bench_train(model, stages, tuple(counts), micro_batches, steps, batch_size, seq_len, lora=lora))
    finally:
        ray.shutdown()


@bench_app.command("codecs")
@_handles_errors
def bench_codecs_cmd(
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline",
                                           help="Also SmolLM2 end to end, one deployment per codec.")] = True,
    stages: Annotated[int, typer.Option(min=2)] = 2,
    batches: Annotated[str, typer.Option(help="Batch sizes for --pipeline.")] = "1,16",
    new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    repeats: Annotated[int, typer.Option(min=1)] = 2,
    setups: Annotated[str | None, typer.Option(
        help="Only these setups, e.g. 'none,int8+zstd,none+encrypted' (default: all).")] = None,
    micro: Annotated[bool, typer.Option("--micro/--no-micro", help="The codec micro-benchmark first.")] = True,
) -> None:
    """Codec encode/decode GB/s on one core and size ratios; then tokens/s per codec end to end."""
    import ray

    from actors.bench.pipeline import bench_codec_pipeline, codec_setups, setup_label
    from actors.bench.codecs import bench_codecs, int8_targets

    chosen = codec_setups()
    if setups:
        wanted = [s.strip() for s in setups.split(",") if s.strip()]
        known = {setup_label(s): s for s in chosen}
        bad = [w for w in wanted if w not in known]
        if bad:
            raise typer.BadParameter(f"unknown setups {bad}: choose from {sorted(known)}", param_hint="--setups")
        chosen = [known[w] for w in wanted]
    if micro:
        rows = list(bench_codecs())
        _emit([*rows, int8_targets(rows)])
    if not pipeline:
        return
    _ensure_model(SMOLLM2_NAME)
    ray.init(address="local", num_gpus=stages, log_to_driver=False, include_dashboard=False)
    try:
        _emit(bench_codec_pipeline(SMOLLM2_NAME, stages, _parse_ints(batches, "--batches") or [1, 16], new_tokens,
                                   repeats, chosen))
    finally:
        ray.shutdown()


@bench_app.command("watch")
@_handles_errors
def bench_watch_cmd(
    replicas: Annotated[str, typer.Option(help="Deployment sizes (replicas), comma-separated.")] = "4,16,48",
    rounds: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """The router's watch of its replicas' states: one GCS read of them all vs one read per replica."""
    from actors.bench.watch import bench_watch

    _emit(bench_watch(_parse_ints(replicas, "--replicas") or [4, 16, 48], rounds=rounds))


@bench_app.command("channels")
@_handles_errors
def bench_channels_cmd(
    actors: Annotated[str, typer.Option(help="Ring sizes, comma-separated.")] = "2,4",
    messages: Annotated[int, typer.Option(min=1, help="Laps timed per (shape, ring, path).")] = 200,
) -> None:
    """ms per hop round a ring of actors: TCP (the rings'), shared memory, gloo, Ray calls, ObjectRefs."""
    from actors.bench.channels import bench_channels

    _emit(bench_channels(actors=_parse_ints(actors, "--actors") or [2, 4], messages=messages))


@bench_app.command("http")
@_handles_errors
def bench_http_cmd(
    model: Annotated[str, typer.Option()] = SMOLLM2_NAME,
    stages: Annotated[int, typer.Option(min=1)] = 2,
    clients: Annotated[str, typer.Option(help="Concurrent clients, comma-separated.")] = "1,8",
    requests: Annotated[int, typer.Option(min=1, help="Requests per round.")] = 16,
    new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8011,
) -> None:
    """The OpenAI-compatible HTTP front against Pipeline calls: tokens/s and time to first token."""
    import ray

    from actors.bench.serve import bench_http

    if model == SMOLLM2_NAME:
        _ensure_model(model)
    ray.init(address="local", num_gpus=stages, log_to_driver=False, include_dashboard=False)
    try:
        _emit(bench_http(model, stages, tuple(_parse_ints(clients, "--clients") or [1]), requests, new_tokens,
                         repeats, port))
    finally:
        ray.shutdown()


@bench_app.command("gpu")
@_handles_errors
def bench_gpu_cmd(
    stages: Annotated[str, typer.Option(help="Stage counts, comma-separated (num_gpus = 1/S each).")] = "1,2,4",
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,16,64",
    new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="cuda, or cpu for a smoke test (tiny default shape).")] = "cuda",
    layers: Annotated[int | None, typer.Option(min=1, help="Default: 16 on cuda, 4 on cpu.")] = None,
    dim: Annotated[int | None, typer.Option(min=8, help="Hidden size. Default: 2048 on cuda, 128 on cpu.")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="Default: 32 on cuda, 4 on cpu.")] = None,
    kv_heads: Annotated[int | None, typer.Option(min=1, help="Default: 8 on cuda, 2 on cpu.")] = None,
    hidden: Annotated[int | None, typer.Option(
        min=1, help="MLP intermediate size. Default: 8192 on cuda, 256 on cpu.")] = None,
    vocab: Annotated[int | None, typer.Option(min=16, help="Default: 32000 on cuda, 512 on cpu.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Default: bfloat16 on cuda, float32 on cpu.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per figure (the best is reported).")] = 2,
    parity: Annotated[bool, typer.Option("--parity/--no-parity",
                                         help="First: greedy tokens vs transformers on a tiny model.")] = True,
    budget_s: Annotated[float, typer.Option(
        min=0, help="Seconds: deployments and batches that would start later are skipped.")] = 400,
    work_dir: Annotated[str | None, typer.Option(help="Where to write the checkpoints (default: temp).")] = None,
    actor_baseline: Annotated[bool, typer.Option(
        "--actor-baseline/--no-actor-baseline",
        help="Also time one process inside a Ray actor (its task thread, its own thread).")] = True,
    fuse_linears: Annotated[bool | None, typer.Option(
        "--fuse-linears/--no-fuse-linears",
        help="q|k|v and gate|up as one matmul each, in the stages and the baselines (default: on a GPU).")] = None,
    cuda_graphs: Annotated[bool | None, typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="The stages' decode steps as CUDA graphs (default: on a GPU); the baselines stay eager.")] = None,
    micro_batches: Annotated[int | None, typer.Option(
        min=1, help="Lanes in flight (default: one per GPU the stages occupy).")] = None,
) -> None:
    """One GPU: a random ~1.1 B Llama as 1, 2, 4 stage actors (fractional GPUs) vs one process; parity."""
    from dataclasses import replace

    from actors.bench.gpu import bench_gpu, default_shape

    if device not in ("cuda", "cpu"):
        raise typer.BadParameter(f"{device!r}: give cuda or cpu", param_hint="--device")
    given = {"n_layers": layers, "dim": dim, "n_heads": heads, "n_kv_heads": kv_heads, "hidden": hidden,
             "vocab": vocab}
    shape = replace(default_shape(device), **{k: v for k, v in given.items() if v is not None})
    if shape.dim % shape.n_heads or shape.n_heads % shape.n_kv_heads:
        raise typer.BadParameter(f"--dim {shape.dim} must divide into --heads {shape.n_heads}, which "
                                 f"--kv-heads {shape.n_kv_heads} divides")
    stage_list = _parse_ints(stages, "--stages") or [1, 2, 4]
    if max(stage_list) > shape.n_layers or min(stage_list) < 1:
        raise typer.BadParameter(f"{stages!r}: each stage count between 1 and the layers ({shape.n_layers})",
                                 param_hint="--stages")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("torch sees no CUDA device: --device cpu runs the smoke test",
                                     param_hint="--device")
    _emit(bench_gpu(stage_list, _parse_ints(batches, "--batches") or [1, 16, 64], new_tokens, prompt_tokens,
                    device, shape, dtype, repeats, parity, budget_s, work_dir, actor_baseline, fuse_linears,
                    cuda_graphs, micro_batches))
