"""The router's watch of its replicas: one GCS read of them all (`actors.gcs.actor_records`) beside one read
per replica (`actor_record`, the baseline), at several deployment sizes, in one Ray session.

Each figure is a round's mean over `rounds`: wall time (the router waits that long for it, now off its event
loop), CPU time in the caller and in the GCS server (every `watch_interval_s`, 50 ms by default).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def _gcs_process() -> Any:
    """The GCS server of the Ray this process started (None when it joined another: no GCS CPU figures)."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if "gcs_server" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def _timed(fn: Callable[[], Any], rounds: int, gcs: Any) -> dict[str, float | None]:
    def gcs_cpu() -> float | None:
        if gcs is None:
            return None
        t = gcs.cpu_times()
        return t.user + t.system

    g0, c0, t0 = gcs_cpu(), time.process_time(), time.perf_counter()
    for _ in range(rounds):
        fn()
    t1, c1, g1 = time.perf_counter(), time.process_time(), gcs_cpu()
    return {"wall_ms": (t1 - t0) * 1e3 / rounds, "caller_cpu_ms": (c1 - c0) * 1e3 / rounds,
            "gcs_cpu_ms": None if g0 is None or g1 is None else (g1 - g0) * 1e3 / rounds}


def bench_watch(replicas: Sequence[int] = (4, 16, 48), rounds: int = 100) -> Iterator[dict[str, Any]]:
    """One dict per deployment size: a watch round read replica by replica, and in one read."""
    import ray

    from actors.gcs import actor_record, actor_records

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Replica:  # stands in for a stage replica: the GCS keeps the same record of any actor
        def ping(self) -> int:
            return 1

    actors: list[Any] = []
    gcs = _gcs_process()
    try:
        for n in sorted(replicas):
            actors += [Replica.remote() for _ in range(n - len(actors))]
            ray.get([a.ping.remote() for a in actors])
            yield {"bench": "watch", "replicas": n, "rounds": rounds,
                   "one_read_each": _timed(lambda: [actor_record(a) for a in actors], rounds, gcs),
                   "one_read": _timed(lambda: actor_records(actors), rounds, gcs)}
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
