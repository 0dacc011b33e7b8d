"""`meshpipe bench gpu`'s pure parts (no Ray, no GPU): the shapes, resources, prompts and rows."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

from actors.bench.gpu import (
    CPU_SHAPE,
    GPU_SHAPE,
    PARITY_SHAPE,
    LlamaShape,
    bench_fused,
    bench_graphs,
    default_dtype,
    default_shape,
    measurement_order,
    parity_row,
    phases_ms,
    prompts_for,
    stage_ms,
    stage_resources_for,
    summary_row,
    throughput_row,
)


def test_params_count_what_the_random_checkpoint_writes(tmp_path: Path) -> None:
    from safetensors import safe_open

    from models.random_checkpoint import save_random_llama

    shape = LlamaShape(n_layers=3, dim=32, n_heads=4, n_kv_heads=2, hidden=48, vocab=100)
    folder = save_random_llama(tmp_path / "m", **asdict(shape))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        written = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not iterable
    assert shape.params() == written


def test_the_gpu_shape_is_a_realistic_1_to_3_b_llama() -> None:
    assert 1e9 <= GPU_SHAPE.params() <= 3e9
    assert GPU_SHAPE.dim % GPU_SHAPE.n_heads == 0 and GPU_SHAPE.n_heads % GPU_SHAPE.n_kv_heads == 0
    assert GPU_SHAPE.n_layers % 4 == 0  # S = 1, 2, 4 split it evenly
    assert default_shape("cuda") is GPU_SHAPE and default_shape("cpu") is CPU_SHAPE
    assert CPU_SHAPE.params() < 1e6 and PARITY_SHAPE.n_layers >= 2
    assert default_dtype("cuda") == "bfloat16" and default_dtype("cpu") == "float32"
    assert GPU_SHAPE.describe()["params"] == GPU_SHAPE.params()


def test_stage_resources_share_one_gpu() -> None:
    assert stage_resources_for(1, 16) == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert stage_resources_for(4, 16) == {"num_gpus": 0.25, "num_cpus": 1.0}
    assert sum(stage_resources_for(3, 16)["num_gpus"] for _ in range(3)) == pytest.approx(1.0)
    assert stage_resources_for(2, 2) == {"num_gpus": 0.5, "num_cpus": 0.0}  # one CPU left to the driver
    with pytest.raises(ValueError):
        stage_resources_for(0, 4)


def test_prompts_are_distinct_and_in_the_vocabulary() -> None:
    ps = prompts_for(64, 16, 512)
    assert len(ps) == 64 and {len(p) for p in ps} == {16}
    assert len({tuple(p) for p in ps}) == 64
    assert min(min(p) for p in ps) >= 3 and max(max(p) for p in ps) < 512


def test_parity_row() -> None:
    same = parity_row([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], stages=2)
    assert same["identical"] and same["agreement"] == 1.0 and same["first_mismatch"] is None
    assert same["stages"] == 2 and same["tokens"] == 5 and same["row"] == "parity"
    off = parity_row([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 9]])
    assert not off["identical"] and off["agreement"] == pytest.approx(4 / 5) and off["first_mismatch"] == [1, 1]
    short = parity_row([[1, 2]], [[1, 2, 3]])
    assert short["agreement"] == pytest.approx(2 / 3) and short["first_mismatch"] == [0, 2]


def test_throughput_row_and_summary() -> None:
    row = throughput_row(4, 64, 64, pipeline_s=2.0, local_s=1.6, deploy_s=9.0)
    assert row["pipeline_tokens_per_s"] == pytest.approx(64 * 64 / 2.0)
    assert row["one_process_tokens_per_s"] == pytest.approx(64 * 64 / 1.6)
    assert row["efficiency"] == pytest.approx(0.8) and row["deploy_s"] == 9.0
    assert row["pipeline_ms_per_step"] == pytest.approx(2000 / 64)
    rows = [parity_row([[1]], [[1]]), throughput_row(1, 64, 64, 1.0, 1.0), row,
            {"bench": "gpu", "row": "skipped", "stages": 2, "reason": "time budget spent"},
            {"bench": "gpu", "row": "error", "stages": 4, "batch": 1, "what": "generate", "error": "x"}]
    s = summary_row(rows, 200.0, stages=4, batch=64)
    assert s["target_met"] is True and s["efficiency"] == pytest.approx(0.8) and s["parity_identical"] is True
    assert s["skipped"] == ["stages=2"] and s["errors"] == ["what=generate stages=4 batch=1"]
    missing = summary_row(rows[:2], 10.0, stages=4, batch=64)
    assert missing["target_met"] is None and missing["efficiency"] is None
    assert summary_row([throughput_row(4, 64, 64, 2.0, 1.0)], 1.0, 4, 64)["target_met"] is False


def test_stage_ms_takes_each_stages_first_replica() -> None:
    replicas = [[{"compute_ms": 3.14159, "inbound_ms": 0.5}, {"compute_ms": 9.0, "inbound_ms": 9.0}],
                [{"compute_ms": None, "inbound_ms": 1}], []]
    assert stage_ms(replicas) == [[3.14, 0.5], [None, 1.0]]


def test_the_targets_cell_is_measured_first() -> None:
    assert measurement_order([1, 2, 4], [1, 16, 64]) == \
        [(4, [64, 16, 1], None), (2, [64, 16, 1], None), (1, [64, 16, 1], None)]
    assert measurement_order([2, 2], [8]) == [(2, [8], None)]
    # the target's cell again with a lane per stage, right after it
    assert measurement_order([1, 4], [1, 64], probe_lanes=True) == \
        [(4, [64, 1], None), (4, [64], 4), (1, [64, 1], None)]
    assert measurement_order([1], [1, 64], probe_lanes=True) == [(1, [64, 1], None)]


def test_phases_are_the_first_replicas_in_stage_order() -> None:
    stages = [{"stage": 1, "replica": 0, "phases_ms": {"forward": 2.0, "sample": 1.0}},
              {"stage": 0, "replica": 1, "phases_ms": {"forward": 9.0}},
              {"stage": 0, "replica": 0, "phases_ms": {"forward": 1.5, "send": 0.5}},
              {"stage": 2, "replica": 0, "down": "RayActorError"}]
    assert phases_ms(stages) == [{"forward": 1.5, "send": 0.5}, {"forward": 2.0, "sample": 1.0}, {}]


def test_the_fused_linears_row_times_both_and_restores_the_default(tiny_ckpt: Path) -> None:
    from models import load_model
    from models.model import FusedLinears

    model = load_model(tiny_ckpt, dtype="float32")
    prompts = {b: prompts_for(b, 4, model.cfg.vocab_size) for b in (1, 2)}
    row = bench_fused(model, prompts, [1, 2], new_tokens=3, repeats=1, sync=lambda: None)
    assert row["row"] == "fused_linears"
    for b in (1, 2):
        assert set(row[f"batch_{b}_ms_per_step"]) == {"fused", "separate"}
        assert all(v > 0 for v in row[f"batch_{b}_ms_per_step"].values())
        assert row[f"batch_{b}_same_tokens"] is True
    fl = [f for m in model.modules() for f in vars(m).values() if isinstance(f, FusedLinears)]
    assert fl and all(f.enabled is None for f in fl)


def test_the_cuda_graphs_row_times_both_and_leaves_the_model_eager(tiny_ckpt: Path) -> None:
    """On a CPU the graphs variant runs padded, uncaptured steps: same tokens, and the baseline left eager."""
    from models import load_model

    model = load_model(tiny_ckpt, dtype="float32")
    prompts = {b: prompts_for(b, 4, model.cfg.vocab_size) for b in (1, 3)}
    row = bench_graphs(model, prompts, [1, 3], new_tokens=3, repeats=1, sync=lambda: None)
    assert row["row"] == "cuda_graphs" and model.graphs is None
    for b in (1, 3):
        assert set(row[f"batch_{b}_ms_per_step"]) == {"eager", "graphs"}
        assert row[f"batch_{b}_same_tokens"] is True
    assert row["graphs"]["uncaptured"] > 0 and row["graphs"]["failed"] is None
