"""Shared fixtures: one real Ray for the whole test session, tiny random checkpoints.

`tests/unit` never starts Ray; tests that need it ask for the `ray_cluster` fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_llama, smollm2_gguf_path

LOGICAL_GPUS = 32  # enough for SmolLM2 with one layer per actor (30 stages)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """A local Ray with logical GPUs (num_gpus=1 actors schedule; torch runs on the CPU)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the export in ~1 s
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
    """A 6-layer random Llama with tied embeddings, in 64 KB safetensors shards, and Llama 3's RoPE
    scaling (trained on 16 positions: every stage must build the same scaled tables)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied") / "llama", n_layers=6, tie=True,
                           sharded=True, seed=1, rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


@pytest.fixture(scope="session")
def hf_smollm2_model():  # noqa: ANN201
    """The outside oracle: transformers' LlamaForCausalLM from its own GGUF loader (~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2():  # noqa: ANN201
    """meshpipe's single-process SmolLM2 (fp32): the reference the pipeline must equal."""
    from models import load_model

    smollm2_gguf_path()
    return load_model("smollm2-135m", dtype="float32")
