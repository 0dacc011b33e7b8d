"""A random-initialised Llama checkpoint, written as a Hugging Face folder without transformers.

Benches need a model of a chosen shape where no weights can be downloaded (a GPU machine with no
network, a tiny model whose compute is negligible). The folder is what `transformers` writes for
`LlamaForCausalLM`: `config.json` plus `model.safetensors` with transformers' parameter names, so
`Pipeline.deploy`, `load_model` and transformers all load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_random_llama(path: str | Path, *, n_layers: int = 8, dim: int = 64, n_heads: int = 4,
                      n_kv_heads: int = 2, hidden: int = 128, vocab: int = 256, max_seq_len: int = 2048,
                      init: float = 0.02, tie: bool = False, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Writes the folder and returns its path; weights ~ N(0, init²), norms 1 + 0.1·N(0, 1)."""
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"dim={dim} must divide into n_heads={n_heads}, which n_kv_heads={n_kv_heads} divides")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    head_dim = dim // n_heads

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * init).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)

    state = {"model.embed_tokens.weight": w(vocab, dim)}  # (V, D)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(n_heads * head_dim, dim),
            p + "self_attn.k_proj.weight": w(n_kv_heads * head_dim, dim),
            p + "self_attn.v_proj.weight": w(n_kv_heads * head_dim, dim),
            p + "self_attn.o_proj.weight": w(dim, n_heads * head_dim),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": w(hidden, dim),
            p + "mlp.up_proj.weight": w(hidden, dim),
            p + "mlp.down_proj.weight": w(dim, hidden),
        })
    state["model.norm.weight"] = norm()
    if not tie:
        state["lm_head.weight"] = w(vocab, dim)
    from models.loading import save_safetensors

    save_safetensors({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab, "hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": head_dim,
        "max_position_embeddings": max_seq_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path
