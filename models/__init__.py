"""The model layer: a Llama-family decoder, its KV cache, sampling, tokenizer and weight loading.

No Ray, no topology/ here. `load_model(source)` and `generate_local` are the single-process reference
that the pipeline must match; `load_stage` builds one stage from its layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.batch import Batch
from models.cache import KVCache, default_pool_tokens
from models.config import ModelConfig, resolve_dtype
from models.errors import (
    CacheFullError,
    CacheMissError,
    ConfigError,
    InvalidRequestError,
    MeshpipeError,
    ModelNotInstalledError,
    NonFiniteLogitsError,
    PromptTooLongError,
    UnknownModelError,
)
from models.generation import Completion, SequenceState, encode_prompt, generate_local, is_batch
from models.loading import build_stage, load_stage
from models.model import Transformer
from models.sampling import SamplingParams, TokenLogprob, sample
from models.speculative import benchmark_speculative, propose_drafts


def load_model(source: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> Transformer:
    """The whole network as one torch module, with `.generate` and `.tokenizer` (the reference)."""
    from models.loading import resolve_source
    from models.tokenizer import load_tokenizer

    model = load_stage(source, dtype=dtype, device=device)
    model.tokenizer = load_tokenizer(resolve_source(source))
    return model


__all__ = [
    "Batch", "CacheMissError", "build_stage", "CacheFullError", "Completion", "ConfigError", "InvalidRequestError", "KVCache",
    "MeshpipeError", "ModelConfig", "ModelNotInstalledError", "NonFiniteLogitsError", "PromptTooLongError",
    "SamplingParams", "SequenceState", "TokenLogprob", "Transformer", "UnknownModelError", "benchmark_speculative", "default_pool_tokens", "encode_prompt",
    "generate_local", "is_batch", "load_model", "load_stage", "propose_drafts", "resolve_dtype", "sample",
]
