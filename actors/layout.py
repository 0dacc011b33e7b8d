"""Where models/ meets topology/: a model's config as the per-layer numbers topology/ splits and places.

`partition` and `place` raise the user-facing ConfigError (topology/'s errors converted).
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.errors import topology_errors
from models.config import ModelConfig
from models.errors import ConfigError
from topology.placement import Gpu, StagePlacement
from topology.placement import place as place_layers
from topology.split import StageCostModel, StageSpec, split


def head_cost(cfg: ModelConfig) -> float:
    """The LM head's compute in units of one decoder layer (about 8 for SmolLM2)."""
    return cfg.embedding_params() / cfg.layer_params()


def cost_model(cfg: ModelConfig, bytes_per_param: float = 4,
               extra_bytes_per_layer: float = 0.0) -> StageCostModel:
    """The stage cost model of `cfg`; `extra_bytes_per_layer` adds headroom (e.g. KV cache) per layer."""
    if not bytes_per_param > 0:
        raise ConfigError(f"bytes_per_param={bytes_per_param!r} must be positive")
    return StageCostModel(n_layers=cfg.n_layers, head_cost=head_cost(cfg),
                          layer_bytes=cfg.layer_params() * bytes_per_param + extra_bytes_per_layer,
                          embedding_bytes=cfg.embedding_params() * bytes_per_param,
                          tie_embeddings=cfg.tie_embeddings, bytes_per_param=bytes_per_param)


def partition(cfg: ModelConfig, num_stages: int | None = None, layers_per_stage: int | None = None,
              stage_memory_bytes: float | None = None, bytes_per_param: int = 4) -> list[StageSpec]:
    """Contiguous layer ranges of `cfg` minimising the costliest stage (`topology.split.split`).

    With `stage_memory_bytes`, no stage may hold more weights.
    """
    with topology_errors():
        return split(cost_model(cfg, bytes_per_param), num_stages, layers_per_stage, stage_memory_bytes)


def place(cfg: ModelConfig, gpus: Sequence[Gpu], num_stages: int | None = None, bytes_per_param: int = 4,
          kv_bytes_per_layer: float = 0.0, *, max_states: int = 200_000) -> list[StagePlacement]:
    """`cfg`'s layers on distinct GPUs minimising the slowest stage (`topology.placement.place`)."""
    with topology_errors():
        return place_layers(cost_model(cfg, bytes_per_param), gpus, num_stages, kv_bytes_per_layer,
                            max_states=max_states)
