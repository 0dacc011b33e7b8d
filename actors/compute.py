"""The one thread a stage process computes on.

OpenMP keeps a pool of worker threads per thread that starts parallel work. A stage process has
several such threads (Ray's task thread, a decode ring's reader and head loops), and two pools in
one process fight over the cores: measured on 2 cores with 2 torch threads, a (1, 576) x (576,
1536) matmul took 0.14 ms from a second computing thread against 0.03 ms from a lone one, and
SmolLM2's decode step 51 ms against 29 ms. So every torch computation of a stage (its weights'
loading, Ray-call steps, ring passes, cache copies) runs on this one thread, with the stage's
torch thread count set there (OpenMP keeps that count per thread too).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

CGROUP = Path("/sys/fs/cgroup")


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity (a container's cpuset, `taskset`), capped by a
    cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; a Kubernetes CPU
    limit), rounded up; never below 1. Not `os.cpu_count()`, which counts the host's cores, and not
    Ray's logical CPUs, which are a scheduling label."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS)
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota(root: Path) -> float | None:
    """The cgroup's CPU quota in cores (None: none set, or no cgroup files to read)."""
    def read(name: str) -> list[str]:
        try:
            with open(root / name, encoding="ascii") as f:
                return f.read(64).split()  # a line of two numbers: a bounded read
        except (OSError, ValueError):
            return []

    for words in (read("cpu.max"), read("cpu/cpu.cfs_quota_us") + read("cpu/cpu.cfs_period_us")):
        try:
            quota, period = float(words[0]), float(words[1])
        except (IndexError, ValueError):  # "max", missing or garbled: no quota here
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None


class ComputeThread:
    """Runs callables on one dedicated thread, in submission order; a call from that thread runs inline."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.inline = False  # `serial()`: one torch thread for good, so any thread may compute
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="meshpipe-compute")
        self._ident = self._pool.submit(self._start).result()

    def serial(self) -> None:
        """From now on the stage computes on one torch thread: no OpenMP pools to fight over the cores,
        so callers compute in their own thread and skip the hand-over (~80 us a call here)."""
        self.run(torch.set_num_threads, 1)
        torch.set_num_threads(1)
        self.inline = True

    def _start(self) -> int:
        torch.set_num_threads(self.threads)
        return threading.get_ident()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the compute thread; its result, or its exception raised here."""
        if self.inline or threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()


def default_threads(num_stages: int, device: str, cores: int) -> int:
    """Torch threads per stage, chosen by measurement (README, Performance).

    On CPUs the stages share the machine's cores: one stage gets them all; several get one thread
    each, since OpenMP's barriers collapse when threads outnumber free cores (a 2-stage pipeline
    with 2 threads each ran 2-10x slower than with 1 under any other load). A GPU stage needs one.
    """
    if not device.startswith("cpu"):
        return 1
    return max(1, cores // num_stages)
