"""The one config of a Llama-family decoder, and the dtype names the public API accepts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from models.errors import ConfigError
from models.rope import RopeScaling

MAX_CONTEXT = 1 << 24  # positions: a config claiming more is refused before its RoPE tables are built
# A config file's sizes are read before any tensor is: these bound what a forged one makes every stage build
# (RoPE tables are max_seq_len x head_dim; a stage lists its layers' keys) before the weights are checked.
MAX_HEAD_DIM = 1024  # real models: 64 to 256
MAX_LAYERS = 4096  # real models: at most a few hundred

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 49152  # rows of the embedding table and of the LM head
    dim: int = 576  # hidden size (d_model)
    n_layers: int = 30  # decoder blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention when < n_heads)
    hidden_dim: int = 1536  # SwiGLU inner size
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 100000.0  # RoPE base frequency
    max_seq_len: int = 8192  # longest prompt + generation the model accepts
    tie_embeddings: bool = True  # the LM head reuses the embedding matrix
    bos_id: int | None = 1  # beginning-of-sequence token, if any
    eos_ids: tuple[int, ...] = (2,)  # tokens that end a generation
    head_dim_override: int | None = None  # per-head size when it is not dim // n_heads
    rope_scaling: RopeScaling | None = None  # RoPE stretched past the trained context (None: plain RoPE)
    qkv_bias: bool = False  # the q, k and v projections add a bias (Qwen2); o and the MLP never do

    def __post_init__(self) -> None:
        ints = {k: getattr(self, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                              "max_seq_len")}
        bad = [f"{k}={v!r}" for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: sizes must be positive integers")
        if self.max_seq_len > MAX_CONTEXT:
            raise ConfigError(f"max_seq_len={self.max_seq_len} is beyond the {MAX_CONTEXT} positions meshpipe supports")
        for k in ("norm_eps", "rope_theta"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"{k}={v!r} must be a finite positive number")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling={self.rope_scaling!r} must be a RopeScaling or None")
        if self.head_dim_override is not None and (not isinstance(self.head_dim_override, int)
                                                   or self.head_dim_override < 1):
            raise ConfigError(f"head_dim={self.head_dim_override!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.head_dim % 2 or self.head_dim > MAX_HEAD_DIM:  # RoPE rotates pairs of dims
            raise ConfigError(f"head_dim={self.head_dim} must be even and at most {MAX_HEAD_DIM}: check the "
                              "config's head_dim, hidden_size and num_attention_heads")
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"n_layers={self.n_layers} is beyond the {MAX_LAYERS} layers meshpipe supports")
        if self.rope_scaling is not None and self.rope_scaling.kind == "yarn" and self.rope_theta <= 1:
            # YaRN's ramp divides by log(rope_theta)
            raise ConfigError(f"rope_theta={self.rope_theta!r} must be above 1 for YaRN scaling")
        if self.n_layers < 1 or self.vocab_size < 1 or self.max_seq_len < 1:
            raise ConfigError(
                f"n_layers={self.n_layers}, vocab_size={self.vocab_size} and "
                f"max_seq_len={self.max_seq_len} must all be positive"
            )

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        d["rope_scaling"] = RopeScaling.from_dict(d.get("rope_scaling"))
        return cls(**d)

    def layer_params(self) -> int:
        """Parameters in one decoder block (for partitioning and memory estimates)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.hidden_dim
        return attn + mlp + 2 * self.dim

    def embedding_params(self) -> int:
        return self.vocab_size * self.dim


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on GPU; otherwise one of DTYPES."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[name]
