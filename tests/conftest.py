"""Shared fixtures: one real Ray for the whole test session, tiny random checkpoints.

`tests/unit` never starts Ray; tests that need it ask for the `ray_cluster` fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_llama

LOGICAL_GPUS = 32  # enough for SmolLM2 with one layer per actor (30 stages)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """A local Ray with logical GPUs (num_gpus=1 actors schedule; torch runs on the CPU)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    info = ray.init(address="local", num_cpus=2, num_gpus=LOGICAL_GPUS, include_dashboard=False,
                    log_to_driver=False)
    yield {"gcs_address": info.address_info["gcs_address"]}
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama (GQA, untied) with wide logit margins (initializer_range=0.5)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", n_layers=4)


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer random Llama with tied embeddings, in 64 KB safetensors shards."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied") / "llama", n_layers=6, tie=True,
                           sharded=True, seed=1)
