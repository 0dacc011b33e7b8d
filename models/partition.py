"""Splitting N decoder layers into S contiguous stages, balanced by compute, within memory."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from models.config import ModelConfig
from models.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    index: int  # position in the pipeline, 0 = first
    layers: tuple[int, ...]  # global indices of the decoder layers it owns (contiguous)
    embed: bool  # owns the token embedding (first stage)
    head: bool  # owns the final norm and LM head, and samples (last stage)

    @property
    def label(self) -> str:
        parts = (["embed"] if self.embed else []) + [f"layers {self.layers[0]}-{self.layers[-1]}"] + (
            ["head"] if self.head else [])
        return f"stage-{self.index} ({', '.join(parts)})"


def head_cost(cfg: ModelConfig) -> float:
    """The LM head's compute in units of one decoder layer (about 8 for SmolLM2)."""
    return cfg.embedding_params() / cfg.layer_params()


def partition(cfg: ModelConfig, num_stages: int | None = None, layers_per_stage: int | None = None,
              stage_memory_bytes: float | None = None, bytes_per_param: int = 4) -> list[StageSpec]:
    """Contiguous layer ranges minimising the costliest stage.

    Cost: one unit a layer, `head_cost` for the LM head; the embedding lookup is free in compute
    but its table counts in memory. With `stage_memory_bytes`, no stage may hold more weights.
    """
    n = cfg.n_layers
    if (num_stages is None) == (layers_per_stage is None):
        raise ConfigError(
            f"give exactly one of num_stages ({num_stages}) and layers_per_stage ({layers_per_stage})"
        )
    if layers_per_stage is not None:
        if not isinstance(layers_per_stage, int) or not 1 <= layers_per_stage <= n:
            raise ConfigError(f"layers_per_stage={layers_per_stage!r} must be between 1 and {n} (the model's layers)")
        bounds = list(range(0, n, layers_per_stage)) + [n]
        return _specs(bounds)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ConfigError(f"num_stages={num_stages!r} must be a positive integer")
    if num_stages > n:
        raise ConfigError(f"num_stages={num_stages} is more stages than the model's {n} layers")

    hc = head_cost(cfg)
    layer_mem = cfg.layer_params() * bytes_per_param
    emb_mem = cfg.embedding_params() * bytes_per_param
    cap = float("inf") if stage_memory_bytes is None else stage_memory_bytes

    def cost(i: int, j: int) -> float:  # layers [i, j)
        return (j - i) + (hc if j == n else 0.0)

    def mem(i: int, j: int) -> float:
        tied_head = j == n and (not cfg.tie_embeddings or i > 0)
        return (j - i) * layer_mem + (emb_mem if i == 0 else 0) + (emb_mem if tied_head else 0)

    @lru_cache(maxsize=None)
    def best(i: int, s: int) -> tuple[float, tuple[int, ...]]:
        """Min over splits of layers [i, n) into s stages of the max stage cost, and the cut points."""
        if s == 1:
            return (cost(i, n), (n,)) if mem(i, n) <= cap else (float("inf"), (n,))
        result = (float("inf"), ())
        for j in range(i + 1, n - s + 2):
            if mem(i, j) > cap:
                break
            rest, cuts = best(j, s - 1)
            worst = max(cost(i, j), rest)
            if worst < result[0]:
                result = (worst, (j, *cuts))
        return result

    worst, cuts = best(0, num_stages)
    if worst == float("inf"):
        raise ConfigError(
            f"{n} layers do not fit in {num_stages} stages of {stage_memory_bytes / 2**30:.2f} GiB each: "
            "use more stages or GPUs with more memory"
        )
    return _specs([0, *cuts])


def _specs(bounds: list[int]) -> list[StageSpec]:
    last = len(bounds) - 2
    return [
        StageSpec(index=s, layers=tuple(range(bounds[s], bounds[s + 1])), embed=s == 0, head=s == last)
        for s in range(last + 1)
    ]
