"""How many cores a stage takes its torch threads from, and the one thread it computes on (no Ray)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from actors.compute import ComputeThread, default_threads, usable_cores


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.parametrize(("files", "quota"), [
    ({}, None),  # no cgroup files: the affinity alone
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu.max": "150000 100000\n"}, 2),  # v2, 1.5 cores: rounded up
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1, one core
    ({"cpu.max": "garbage\n" + "9" * 10_000}, None),  # unreadable: ignored, read no further than a line
    ({"cpu.max": "100000 0\n"}, None),  # a zero period is no quota
])
def test_usable_cores_is_the_affinity_capped_by_a_cgroup_quota(tmp_path: Path, files: dict[str, str],
                                                                quota: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    expected = _affinity() if quota is None else min(_affinity(), quota)
    assert usable_cores(tmp_path) == expected


def test_usable_cores_follows_this_process_affinity(tmp_path: Path) -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity API here")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores(tmp_path) == 1
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cores(tmp_path) == len(before)


def test_default_threads_split_the_cores_among_stages_and_a_gpu_stage_takes_one() -> None:
    assert default_threads(1, "cpu", 8) == 8
    assert default_threads(4, "cpu", 8) == 2
    assert default_threads(4, "cpu", 2) == 1
    assert default_threads(1, "cuda:0", 16) == 1


def test_the_compute_thread_runs_calls_on_one_thread_and_inline_from_it() -> None:
    compute = ComputeThread(1)
    ident = compute.run(threading.get_ident)
    assert ident != threading.get_ident()
    assert compute.run(lambda: compute.run(threading.get_ident)) == ident  # nested: inline, no deadlock
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)
