"""transformers' Llama computing RMSNorm and the RoPE tables in the model's dtype (test-only).

transformers computes both in float32 whatever the model's dtype: that alone moves a float64 model's
loss by ~1e-6, so the float64 oracles patch them while they run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _norm(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if self.rope_type != "default":  # its scaled frequencies are not recomputed here: compare in float32
        raise NotImplementedError(f"the float64 oracle has no {self.rope_type!r} RoPE")
    dim = self.inv_freq.numel() * 2
    theta = self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    emb = torch.cat([position_ids[..., None].double() * inv_freq] * 2, dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@contextmanager
def hf_llama_float64() -> Iterator[None]:
    """While inside, every transformers Llama computes RMSNorm and RoPE in float64 (then its dtype)."""
    from transformers.models.llama import modeling_llama as hf_llama

    saved = hf_llama.LlamaRMSNorm.forward, hf_llama.LlamaRotaryEmbedding.forward
    hf_llama.LlamaRMSNorm.forward, hf_llama.LlamaRotaryEmbedding.forward = _norm, _rope
    try:
        yield
    finally:
        hf_llama.LlamaRMSNorm.forward, hf_llama.LlamaRotaryEmbedding.forward = saved
