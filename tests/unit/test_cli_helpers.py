"""How many GPUs a local Ray started by the command line declares: logical ones only on a machine without
CUDA (they let `num_gpus=1` stage actors schedule; torch runs them on the CPU); with CUDA, Ray counts the
real ones, so no stage gets a CUDA_VISIBLE_DEVICES naming a GPU that does not exist."""

from __future__ import annotations

from typing import Any

import pytest

from actors.cli_helpers import local_gpus


def test_logical_gpus_only_without_cuda() -> None:
    assert local_gpus(4, cuda_devices=0) == 4
    assert local_gpus(8, cuda_devices=0) == 8
    assert local_gpus(4, cuda_devices=1) is None  # Ray detects the one real GPU, not 4 made-up ones
    assert local_gpus(4, cuda_devices=8) is None


@pytest.mark.parametrize(("cuda_devices", "declared"), [(0, 6), (2, None)])
def test_init_ray_declares_what_local_gpus_decides(monkeypatch: pytest.MonkeyPatch, cuda_devices: int,
                                                   declared: int | None) -> None:
    """`meshpipe train/demo/serve/generate` start their local Ray through `_init_ray` (no Ray starts here)."""
    import ray
    import torch

    from actors.cli import _init_ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    assert _init_ray(None, 6, dashboard=True) is True
    assert calls == [{"address": "local", "num_gpus": declared, "log_to_driver": False,
                      "include_dashboard": True}]


def test_stages_share_the_local_gpus_when_there_are_fewer_than_stages() -> None:
    from actors.cli_helpers import local_stage_resources

    assert local_stage_resources(4, cuda_devices=0) is None  # CPUs: logical GPUs, one each
    assert local_stage_resources(4, cuda_devices=4) is None  # one GPU each
    assert local_stage_resources(4, cuda_devices=1) == {"num_gpus": 0.25, "num_cpus": 0}  # the demo on one GPU
    assert local_stage_resources(3, cuda_devices=2) == {"num_gpus": 0.5, "num_cpus": 0}  # two on one, one on the other
