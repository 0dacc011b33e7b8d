"""`meshpipe bench gpu` end to end on the CPU (its smoke-test shape) on the session Ray: the benchmark a lent
GPU machine runs once, in one call, must not rot between such runs."""

from __future__ import annotations

import pytest

from actors.bench.gpu import bench_gpu

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_the_gpu_bench_runs_every_row_on_the_cpu_with_parity() -> None:
    rows = list(bench_gpu(stages=(2,), batches=(1, 2), new_tokens=4, prompt_tokens=4, device="cpu", repeats=1,
                          actor_baseline=False, budget_s=300))
    kinds = [r.get("row") for r in rows]
    assert kinds[:4] == ["parity", "model", "fused_linears", "cuda_graphs"], rows
    parity = rows[0]
    assert parity["identical"] and parity["agreement"] == 1.0 and parity["stage_device"] == "cpu", parity
    throughput = [r for r in rows if r.get("row") == "throughput"]
    assert {r["batch"] for r in throughput} == {1, 2} and all(r["stages"] == 2 for r in throughput), throughput
    for r in throughput:  # each beside its one-process baseline, with the stages' own phases
        assert r["pipeline_tokens_per_s"] > 0 and r["one_process_tokens_per_s"] > 0, r
        assert len(r["phases_ms"]) == 2 and "forward" in r["phases_ms"][0], r
    summary = rows[-1]
    assert summary["row"] == "summary" and summary["errors"] == [] and summary["skipped"] == [], summary
    assert summary["parity_identical"] is True and summary["efficiency"] is not None, summary
