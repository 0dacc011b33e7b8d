"""A training stage's RNG state (what a step boundary and a checkpoint keep): LoRA dropout replays exactly
after `restore`, on the device the stage runs on (the GPU's generator there, not only the CPU's)."""

from __future__ import annotations

from pathlib import Path

import torch

from actors.train_stage import TrainStage
from actors.train_checkpoint import _rng_grid_ok
from models.lora import LoraLinear


def _dropout_draw(stage: TrainStage) -> torch.Tensor:
    """The mask the stage's first LoRA layer's dropout draws in training mode (its B starts at zero, so the
    layer's output would not show it)."""
    layer = next(m for m in stage.model.modules() if isinstance(m, LoraLinear))
    assert layer.dropout.training
    return layer.dropout(torch.ones(4, layer.base.in_features, dtype=torch.float64, device=stage.device))


def test_restore_replays_lora_dropout_from_the_saved_state_in_either_format(tiny_ckpt: Path) -> None:
    stage = TrainStage(str(tiny_ckpt), [0, 1], True, False, "float64", {"name": "sgd", "lr": 0.1}, "rng", 0,
                       lora={"r": 2, "alpha": 4, "dropout": 0.5, "targets": ["q_proj"]})
    boundary, rng = stage.checkpoint(), stage.rng_state()
    assert set(rng) == ({"cpu", "cuda"} if stage.device.type == "cuda" else {"cpu"})
    first = _dropout_draw(stage)
    assert not torch.equal(first, _dropout_draw(stage))  # the stream moves on: masks differ
    stage.restore(boundary, rng)
    assert torch.equal(first, _dropout_draw(stage))
    if stage.device.type == "cpu":  # a checkpoint from before GPU states were kept: the CPU's tensor alone
        stage.restore(boundary, rng["cpu"])
        assert torch.equal(first, _dropout_draw(stage))


def test_a_checkpoints_rng_grid_must_hold_one_state_per_copy_and_stage() -> None:
    state = {"cpu": torch.get_rng_state()}
    assert _rng_grid_ok([[state, state]], copies=1, stages=2)
    assert _rng_grid_ok([[torch.get_rng_state()], [state]], copies=2, stages=1)  # older checkpoints
    for bad in ([[state]], [[state, state]] * 2, [state, state], [[state, "x"]], [[state, {"gpu": state["cpu"]}]],
                [[state, {"cpu": torch.zeros(3)}]], [[state, {}]], {"0": [state, state]}):
        assert not _rng_grid_ok(bad, copies=1, stages=2), bad
