"""Helpers that make tiny random checkpoints (HF folders, GGUF files) and find SmolLM2's GGUF.

transformers is a test-only dependency: it is imported inside the helpers that need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import ModelNotInstalledError
from models.sources import SMOLLM2_NAME, resolve_source


def make_tiny_llama(
    path: str | Path,
    *,
    n_layers: int = 4,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden: int = 128,
    vocab: int = 256,
    tie: bool = False,
    init: float = 0.5,
    seed: int = 0,
    sharded: bool = False,
    dtype: torch.dtype = torch.float32,
    random_norms: bool = True,
    max_positions: int = 256,
    rope: dict | None = None,
    qwen2: bool = False,
) -> Path:
    """Save a random Llama (transformers' LlamaForCausalLM) as a safetensors HF folder.

    ``init`` is transformers' ``initializer_range`` (large, so greedy decoding has clear margins).
    ``random_norms`` sets RMSNorm weights to 1 + 0.1·N(0, 1) (transformers initialises them to
    ones, which would hide a swapped norm). ``sharded`` writes ~64 KB shards with an index.
    ``rope``: a RoPE scaling (transformers' `rope_parameters` entries besides the base). ``qwen2``:
    transformers' Qwen2ForCausalLM instead (q/k/v biases, drawn like the weights: it inits them to 0).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    config = (Qwen2Config if qwen2 else LlamaConfig)(  # type: ignore[call-arg]
        vocab_size=vocab,
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        intermediate_size=hidden,
        initializer_range=init,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", **(rope or {}), "rope_theta": 10000.0},
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = (Qwen2ForCausalLM if qwen2 else LlamaForCausalLM)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if random_norms and name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(init * torch.randn(p.shape, generator=gen))
    model = model.to(dtype)
    # transformers 5 always writes safetensors (no `safe_serialization=`) and drops the tied
    # lm_head from the files.
    model.save_pretrained(path, max_shard_size="64KB" if sharded else "50GB")
    return path


def poison_token(folder: str | Path, token: int) -> Path:
    """`folder`'s (untied, one-file) checkpoint with token `token`'s embedding row NaN: a prompt ending in it
    has NaN logits, as a model overflowing its dtype would."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][token] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(folder)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF rotate_half -> GGUF interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
}


def make_tiny_gguf(
    path: str | Path,
    hf_folder: str | Path,
    *,
    tokenizer_model: str = "gpt2",
    architecture: str = "llama",
    float16: bool = False,
    chat_template: str | None = None,
) -> Path:
    """Convert a tiny HF folder (from make_tiny_llama) to a GGUF the way llama.cpp does.

    q/k rows are permuted like llama.cpp; the tokenizer is a byte-level BPE whose tokens are the
    256 byte symbols (no merges), so it needs ``vocab=256``. ``chat_template`` goes in the metadata.
    """
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf_folder, path = Path(hf_folder), Path(path)
    cfg = json.loads((hf_folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(hf_folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list([bytes_to_unicode()[b] for b in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    rope = cfg["rope_parameters"]
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, cfg["hidden_size"] // n_heads))
    elif rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    for name, t in sorted(tensors.items()):
        arr = t.float().numpy()
        if name.startswith("model.layers."):
            _, _, index, suffix = name.split(".", 3)
            gname = f"blk.{index}.{_GGUF_NAMES[suffix]}"
            if architecture == "llama" and suffix.startswith("self_attn.q_proj"):  # qwen2's stay as they are
                arr = llama_cpp_permute(arr, n_heads)
            elif architecture == "llama" and suffix.startswith("self_attn.k_proj"):
                arr = llama_cpp_permute(arr, n_kv)
        else:
            gname = _GGUF_NAMES[name]
        if float16 and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 scaling: what each frequency is divided by (its converter's rule)."""
    import math

    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                              rope["high_freq_factor"], rope["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


TINY_CHAT_TEMPLATE = (  # ChatML, as SmolLM2's, spelled in the tiny byte-level vocabulary
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def smollm2_gguf_path() -> Path:
    """The installed SmolLM2 GGUF, or skip the test when the wheel is not installed."""
    try:
        return resolve_source(SMOLLM2_NAME)
    except ModelNotInstalledError as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
