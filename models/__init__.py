"""The model layer: a Llama-family decoder, its KV cache, sampling, tokenizer and weight loading.

No Ray here. `load_model(source)` is the single-process reference that the pipeline must match.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.cache import KVCache
from models.config import ModelConfig, resolve_dtype
from models.errors import (
    CacheMissError,
    ConfigError,
    InvalidRequestError,
    MeshpipeError,
    ModelNotInstalledError,
    PromptTooLongError,
    UnknownModelError,
)
from models.generation import Completion, SequenceState, encode_prompt, is_batch
from models.model import Batch, Transformer
from models.partition import StageSpec, partition
from models.sampling import SamplingParams, TokenLogprob, sample


def load_stage(source: str | Path, spec: StageSpec | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", config: ModelConfig | None = None) -> Transformer:
    """Builds the module for one stage (the whole model when `spec` is None), reading only its tensors."""
    from models.loading import load_state_dict, read_config, resolve_source

    path = resolve_source(source)
    cfg = config or read_config(path)
    dt = resolve_dtype(dtype, device)
    layers = list(spec.layers) if spec else list(range(cfg.n_layers))
    embed, head = (spec.embed, spec.head) if spec else (True, True)
    return build_stage(cfg, spec, load_state_dict(path, cfg, layers, embed=embed, head=head, dtype=dt), device)


def build_stage(cfg: ModelConfig, spec: StageSpec | None, state: dict[str, torch.Tensor],
                device: str | torch.device = "cpu") -> Transformer:
    """The stage's module around tensors already loaded (assigned, not copied, on the CPU)."""
    layers = list(spec.layers) if spec else list(range(cfg.n_layers))
    embed, head = (spec.embed, spec.head) if spec else (True, True)
    with torch.device("meta"):
        model = Transformer(cfg, layers, embed=embed, head=head)
    model.load_weights(state)
    return model.to(device).eval()


def load_model(source: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> Transformer:
    """The whole network as one torch module, with `.generate` and `.tokenizer` (the reference)."""
    from models.loading import resolve_source
    from models.tokenizer import load_tokenizer

    model = load_stage(source, None, dtype, device)
    model.tokenizer = load_tokenizer(resolve_source(source))
    return model


__all__ = [
    "Batch", "CacheMissError", "build_stage", "Completion", "ConfigError", "InvalidRequestError", "KVCache",
    "MeshpipeError", "ModelConfig", "ModelNotInstalledError", "PromptTooLongError", "SamplingParams", "SequenceState",
    "StageSpec", "TokenLogprob", "Transformer", "UnknownModelError", "encode_prompt", "is_batch",
    "load_model", "load_stage", "partition", "resolve_dtype", "sample",
]
