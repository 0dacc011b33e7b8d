"""RoPE past the trained context: the scalings Llama-family checkpoints ship (linear, Llama 3's, YaRN).

Each one changes only the rotary frequencies (and, for YaRN, the size of cos and sin), so the tables
in `models.model.rope_tables` are built once per stage and nothing changes on the per-token path.
Dynamic NTK (frequencies that move with the sequence's length, so a cached key would have been rotated
with other ones) and LongRoPE (Phi-3) are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from models.errors import ConfigError

KINDS = ("linear", "llama3", "yarn", "factors")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "linear" | "llama3" | "yarn" (Hugging Face's rope_type) | "factors" (a GGUF's rope_freqs)
    factor: float = 1.0  # how many times the trained context the positions are stretched over
    original_max_positions: int | None = None  # the context the model was trained on (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept as trained
    beta_fast: float = 32.0  # yarn: rotations over the trained context above which a dim is kept as trained
    beta_slow: float = 1.0  # yarn: rotations below which a dim is fully interpolated (divided by factor)
    truncate: bool = True  # yarn: the ramp's ends rounded to whole dims (as the paper's code does)
    attention_factor: float = 1.0  # yarn: cos and sin are scaled by it (YaRN's mscale)
    freq_factors: tuple[float, ...] = ()  # factors: each rotary frequency divided by its own factor

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind={self.kind!r} must be one of {', '.join(KINDS)}")
        for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                problems.append(f"{k}={v!r} must be a finite positive number")
        if self.kind in ("llama3", "yarn"):
            n = self.original_max_positions
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                problems.append(f"original_max_position_embeddings={n!r} must be a positive integer for {self.kind}")
        if self.kind == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            problems.append(f"low_freq_factor={self.low_freq_factor} must be below high_freq_factor="
                            f"{self.high_freq_factor}")
        if self.kind == "factors" and (not self.freq_factors or
                                       not all(isinstance(f, float) and 0 < f < math.inf for f in self.freq_factors)):
            problems.append("rope frequency factors must be finite positive numbers")
        if problems:
            raise ConfigError("RoPE scaling: " + "; ".join(problems))

    def to_hf(self) -> dict[str, Any]:
        """As a Hugging Face `rope_scaling` entry (what `from_hf` reads back; "factors" has none)."""
        if self.kind == "factors":
            raise ConfigError("RoPE frequency factors from a GGUF file have no Hugging Face config form")
        out: dict[str, Any] = {"rope_type": self.kind, "factor": self.factor}
        if self.kind == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_positions)
        elif self.kind == "yarn":
            out.update(original_max_position_embeddings=self.original_max_positions, beta_fast=self.beta_fast,
                       beta_slow=self.beta_slow, truncate=self.truncate, attention_factor=self.attention_factor)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | RopeScaling | None) -> RopeScaling | None:
        """From `dataclasses.asdict` (a config that travelled as a dict)."""
        if d is None or isinstance(d, RopeScaling):
            return d
        d = dict(d)
        d["freq_factors"] = tuple(d.get("freq_factors", ()))
        return cls(**d)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for stretching by `factor` (Eq. 21 of the paper): 1 when not stretched."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def from_hf(params: dict[str, Any], max_positions: int, where: str) -> RopeScaling | None:
    """A Hugging Face `rope_scaling` / `rope_parameters` dict -> RopeScaling (None: plain RoPE)."""
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3", "yarn"):
        raise ConfigError(f"{where}: RoPE scaling type {kind!r} is not supported (supported: linear, llama3, yarn; "
                          "dynamic NTK would rotate cached keys and new ones differently)")

    def num(key: str, default: Any = None) -> Any:
        v = params.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: rope_scaling {key}={v!r} must be a number")
        return v

    original = num("original_max_position_embeddings")
    original = int(original) if original is not None and float(original).is_integer() else original
    factor = num("factor")
    if kind == "yarn" and factor is None and isinstance(original, int) and original > 0:
        factor = max_positions / original  # as DeepSeek-V3-style configs leave it
    if factor is None:
        raise ConfigError(f"{where}: rope_scaling of type {kind!r} needs a factor")
    fields: dict[str, Any] = {"kind": kind, "factor": float(factor)}
    if kind == "llama3":
        fields.update(original_max_positions=original, low_freq_factor=float(num("low_freq_factor", 1.0)),
                      high_freq_factor=float(num("high_freq_factor", 4.0)))
    elif kind == "yarn":
        attention = num("attention_factor")
        if attention is None:
            mscale, mscale_all_dim = num("mscale"), num("mscale_all_dim")
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) \
                if mscale and mscale_all_dim else yarn_mscale(factor)
        fields.update(original_max_positions=original, beta_fast=float(num("beta_fast") or 32.0),
                      beta_slow=float(num("beta_slow") or 1.0), truncate=bool(params.get("truncate", True)),
                      attention_factor=float(attention))
    try:
        return RopeScaling(**fields)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def inv_freq(theta: float, head_dim: int, scaling: RopeScaling | None) -> torch.Tensor:
    """(head_dim // 2,) float64 rotary frequencies on the CPU, scaled."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return base
    s = scaling
    if s.kind == "linear":
        return base / s.factor
    if s.kind == "factors":
        if len(s.freq_factors) != base.numel():
            raise ConfigError(f"{len(s.freq_factors)} RoPE frequency factors for {base.numel()} frequencies "
                              f"(head_dim {head_dim})")
        return base / torch.tensor(s.freq_factors, dtype=torch.float64)
    if s.kind == "llama3":  # long wavelengths stretched, short ones kept, the middle blended
        wavelen = 2 * math.pi / base
        smooth = ((s.original_max_positions / wavelen - s.low_freq_factor)
                  / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)  # 0 past the long end, 1 past the short
        return (1 - smooth) * base / s.factor + smooth * base
    # yarn: dims that turn fewer than beta_slow times over the trained context are interpolated, those
    # turning more than beta_fast times kept, a linear ramp between
    def dim_of(rotations: float) -> float:
        return head_dim * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of no width
    keep = 1 - ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return base / s.factor * (1 - keep) + base * keep


def attention_factor(scaling: RopeScaling | None) -> float:
    """What cos and sin are multiplied by (YaRN's mscale; 1 otherwise)."""
    return scaling.attention_factor if scaling is not None and scaling.kind == "yarn" else 1.0
