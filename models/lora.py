"""LoRA (Hu et al., 2021) for our `Transformer`, read top to bottom, equal to Hugging Face `peft`'s.

A targeted `nn.Linear` W becomes `LoraLinear`: y = W x + (alpha / r) * B A dropout(x), W frozen, A (r, in)
and B (out, r) trained. A starts as peft's (kaiming-uniform, a=sqrt(5)), B at zero, so the wrapped model
starts equal to the base. Targets use transformers' names, as peft users write them ("q_proj", "v_proj",
... or "all-linear"); our modules are `layers.N.attention.wq` etc. (see `MODULES`).

Every function works on one pipeline stage (a `Transformer` holding some layers) as well as on the whole
model: a stage's LoRA tensors are keyed by global layer id, so the stages' `lora_state_dict`s merge into
the whole model's, and `save_peft_adapter` writes the merged dict as a peft adapter folder.

State dicts: a wrapped module's tensors are `<m>.base.weight`, `<m>.lora_A.weight` and `<m>.lora_B.weight`
(`model.state_dict()` round-trips through `model.load_state_dict`). A checkpoint of the unwrapped model
(`<m>.weight`) still loads into the base of a wrapped one. `merged_state_dict` is the plain model's state
dict with B A folded into W (what `models.loading.save_hf` exports); `lora_state_dict` /
`load_lora_state_dict` are just the adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import ConfigError
from models.model import Transformer

# transformers' (peft's) name of each linear in a decoder layer -> (our path, transformers' path) in the layer
MODULES: dict[str, tuple[str, str]] = {  # in transformers' module order (peft wraps them in this order)
    "q_proj": ("attention.wq", "self_attn.q_proj"),
    "k_proj": ("attention.wk", "self_attn.k_proj"),
    "v_proj": ("attention.wv", "self_attn.v_proj"),
    "o_proj": ("attention.wo", "self_attn.o_proj"),
    "gate_proj": ("feed_forward.w1", "mlp.gate_proj"),
    "up_proj": ("feed_forward.w3", "mlp.up_proj"),
    "down_proj": ("feed_forward.w2", "mlp.down_proj"),
}
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear of the decoder layers (not the LM head)
PEFT_PREFIX = "base_model.model.model.layers."  # peft's keys of a LlamaForCausalLM's decoder layers


# --------------------------------------------------------------------------- config


@dataclass
class LoraConfig:
    """Which linears get an adapter and its shape. Checked on construction (`ConfigError`)."""

    r: int = 8  # rank of B A: A is (r, in_features), B is (out_features, r)
    alpha: float = 16.0  # the update is scaled by alpha / r (peft's lora_alpha)
    dropout: float = 0.0  # dropout on the adapter's input, in training mode only (0: none)
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # transformers' module names, or ("all-linear",)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # peft accepts target_modules="all-linear"
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r={self.r!r}: give the adapter rank, an integer >= 1 (e.g. 8)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"lora alpha={self.alpha!r}: give a number > 0 (the update is scaled by alpha / r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout={self.dropout!r}: give a probability in [0, 1) (0: no dropout)")
        if not self.targets:
            raise ConfigError(f"lora targets is empty: give module names from {valid_targets()}")
        for t in self.targets:
            if not isinstance(t, str) or (t != ALL_LINEAR and t not in MODULES):
                raise ConfigError(f"lora target {t!r} is not a module of the model: give names from "
                                  f"{valid_targets()}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """A config from plain data (a YAML / JSON section); unknown keys are an error."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"lora config has unknown key(s) {unknown}: the keys are {known}")
        return cls(**dict(d))

    @property
    def modules(self) -> tuple[str, ...]:
        """The targeted module names, "all-linear" expanded, in `MODULES` order."""
        wanted = set(MODULES) if ALL_LINEAR in self.targets else set(self.targets)
        return tuple(m for m in MODULES if m in wanted)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def valid_targets() -> list[str]:
    return [*MODULES, ALL_LINEAR]


# --------------------------------------------------------------------------- the wrapped linear


class LoraLinear(nn.Module):
    """y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r, with `base` (an `nn.Linear`) frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scaling = r, alpha / r
        # made and initialised as peft does (CPU, torch's default dtype; it draws from the same RNG
        # stream), then moved to the base's device and dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.reset_lora(generator)
        self.lora_A.to(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B.to(device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """peft's default init: A kaiming-uniform (a=sqrt(5)), B zeros (the update starts at 0).

        A is drawn on the CPU in torch's default dtype (as peft draws it), from `generator` (a CPU one)
        or else torch's global RNG, then copied: the same draw gives the same A on any device."""
        w = torch.empty(self.lora_A.weight.shape, device="cpu")
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(w)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A: the plain linear's weight that computes the same (a new tensor)."""
        return self.base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of the unwrapped model names the frozen weight `<m>.weight` (and bias): the base's
        for name in ("weight", "bias"):
            if prefix + name in state_dict and prefix + "base." + name not in state_dict:
                state_dict[prefix + "base." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --------------------------------------------------------------------------- applying it


def _module_seed(seed: int, layer_id: int, target: str) -> int:
    """A 63-bit seed from (seed, global layer id, target name): the same in every process and split."""
    digest = hashlib.sha256(f"meshpipe-lora/{seed}/{layer_id}/{target}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def apply_lora(model: Transformer, cfg: LoraConfig, seed: int | None = None) -> int:
    """Wrap every targeted linear of `model`'s layers in a `LoraLinear`; freeze all other parameters.

    Returns how many modules were wrapped (0 for a stage without layers, e.g. head-only). With `seed`,
    each A is drawn from its own generator seeded by (seed, global layer id, target name), so a model
    split into any stages gets, module for module, the A the whole model gets with the same seed. Without
    it, A comes from torch's global RNG (as in peft), which differs with the split.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("the model already has LoRA adapters: apply_lora once, to a plain model")
    model.requires_grad_(False)
    count = 0
    for layer_id, layer in model.layers.items():
        for target in cfg.modules:
            parent_path, _, attr = MODULES[target][0].rpartition(".")
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr, None)
            if not isinstance(base, nn.Linear):
                raise ConfigError(f"lora target {target!r}: layer {layer_id} has no linear "
                                  f"{MODULES[target][0]!r} (valid targets: {valid_targets()})")
            gen = None if seed is None else torch.Generator().manual_seed(_module_seed(seed, int(layer_id), target))
            setattr(parent, attr, LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout, gen))
            count += 1
    model.weights_changed()  # captured decode graphs called the plain linears
    return count


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The wrapped modules by their path (`layers.3.attention.wq`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


# --------------------------------------------------------------------------- state dicts


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (detached, shared with the model), `layers.3.attention.wq.lora_A.weight`."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors (`lora_state_dict`'s keys, e.g. a resumed stage's) into `model`'s adapters.
    The keys must be exactly this model's adapter keys (`ConfigError` names the differences)."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"LoRA tensors do not match the model's adapters: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise ConfigError(f"LoRA tensor {k!r} has shape {tuple(state[k].shape)}, the model's is {tuple(v.shape)}")
        v.copy_(state[k])


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as if it had no LoRA: each wrapped `<m>.weight` holds W + (alpha / r) B A,
    no adapter keys and no `base.` infix (what `models.loading.save_hf` exports)."""
    wrapped = lora_modules(model)
    merged = {f"{name}.base.weight": (f"{name}.weight", m.merged_weight()) for name, m in wrapped.items()}
    merged.update({f"{name}.base.bias": (f"{name}.bias", m.base.bias.detach()) for name, m in wrapped.items()
                   if m.base.bias is not None})  # a bias is the base's, unchanged
    skip = {f"{name}.lora_{ab}.weight" for name in wrapped for ab in "AB"}
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k in merged:
            out[merged[k][0]] = merged[k][1]
        elif k not in skip:
            out[k] = v
    return out


# --------------------------------------------------------------------------- peft's adapter format


def peft_key(key: str) -> str:
    """Our adapter key -> peft's: `layers.3.attention.wq.lora_A.weight` ->
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (keys already peft's pass through)."""
    if key.startswith(PEFT_PREFIX):
        return key
    ours = {path: hf for path, hf in MODULES.values()}
    parts = key.split(".")
    path, tail = ".".join(parts[2:-2]), ".".join(parts[-2:])
    if len(parts) != 6 or parts[0] != "layers" or not parts[1].isdigit() or path not in ours \
            or tail not in ("lora_A.weight", "lora_B.weight"):
        raise ConfigError(f"{key!r} is not a LoRA tensor key (e.g. layers.0.attention.wq.lora_A.weight)")
    return f"{PEFT_PREFIX}{parts[1]}.{ours[path]}.{tail}"


def peft_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This model's (stage's) adapter tensors under peft's names (`adapter_model.safetensors`'s keys)."""
    return {peft_key(k): v for k, v in lora_state_dict(model).items()}


def peft_adapter_config(cfg: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """peft's `adapter_config.json` for `cfg` (a LoRA for a causal LM, no bias, peft's default init)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.modules),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "inference_mode": True}


def save_peft_adapter(folder: str | Path, cfg: LoraConfig, tensors: Mapping[str, torch.Tensor],
                      base_model: str | None = None) -> Path:
    """Write a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained(hf_model, folder)` loads. `tensors`: the adapter under our names,
    e.g. the union of every stage's `lora_state_dict` (peft's names, `peft_adapter_state`, also do)."""
    from models.loading import save_safetensors

    if not tensors:
        raise ConfigError("no LoRA tensors to save: apply_lora first and gather every stage's lora_state_dict")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {peft_key(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_safetensors(out, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(peft_adapter_config(cfg, base_model), indent=2))
    return folder

