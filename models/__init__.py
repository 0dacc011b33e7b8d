"""The model layer: a Llama-family decoder, its KV cache, sampling, tokenizer and weight loading.

No Ray, no topology/ here. `load_model(source)` and `generate_local` are the single-process reference
that the pipeline must match; `load_stage` builds one stage from its layers.

The public names load on first use (PEP 562): the errors and `models.sources` import no torch, so the
CLI answers `--help` and a bad argument without torch's second of imports.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

_WHERE = {
    **dict.fromkeys(["CacheFullError", "CacheMissError", "ConfigError", "InvalidRequestError", "MeshpipeError",
                     "ModelNotInstalledError", "NonFiniteLogitsError", "PromptTooLongError",
                     "UnknownModelError"], "models.errors"),
    "Batch": "models.batch", "KVCache": "models.cache", "default_pool_tokens": "models.cache",
    "ModelConfig": "models.config", "resolve_dtype": "models.config",
    **dict.fromkeys(["Completion", "SequenceState", "encode_prompt", "generate_local", "is_batch"],
                    "models.generation"),
    "build_stage": "models.loading", "load_stage": "models.loading", "Transformer": "models.model",
    "SamplingParams": "models.sampling", "TokenLogprob": "models.sampling", "sample": "models.sampling",
    "benchmark_speculative": "models.speculative", "propose_drafts": "models.speculative",
}


def load_model(source: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> Transformer:
    """The whole network as one torch module, with `.generate` and `.tokenizer` (the reference)."""
    from models import loading
    from models.sources import resolve_source
    from models.tokenizer import load_tokenizer

    model = loading.load_stage(source, dtype=dtype, device=device)
    model.tokenizer = load_tokenizer(resolve_source(source))
    return model


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once: later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "Batch", "CacheFullError", "CacheMissError", "Completion", "ConfigError", "InvalidRequestError", "KVCache",
    "MeshpipeError", "ModelConfig", "ModelNotInstalledError", "NonFiniteLogitsError", "PromptTooLongError",
    "SamplingParams", "SequenceState", "TokenLogprob", "Transformer", "UnknownModelError", "benchmark_speculative",
    "build_stage", "default_pool_tokens", "encode_prompt", "generate_local", "is_batch", "load_model", "load_stage",
    "propose_drafts", "resolve_dtype", "sample",
]

if TYPE_CHECKING:
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
