"""models/lora.py against Hugging Face peft on transformers' LlamaForCausalLM (float64, tiny checkpoint):
the same init, logits, three AdamW steps and exports; seeded init independent of the pipeline split."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models import Batch, ConfigError, load_model, load_stage
from models.loading import _umask, save_hf
from models.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merged_state_dict,
    peft_adapter_state,
    save_peft_adapter,
)
from tests.hf_float64 import hf_llama_float64

CFG = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))
BATCH = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(0))  # (B, T)
TOL = 1e-9


def _packed(batch: torch.Tensor) -> tuple[torch.Tensor, Batch, torch.Tensor]:
    """Rows as one packed step from position 0, with each token's next-token target (-100 after the last)."""
    B, T = batch.shape
    targets = torch.cat([batch[:, 1:], torch.full((B, 1), -100)], 1).reshape(-1)
    return batch.reshape(-1), Batch.build([str(i) for i in range(B)], [0] * B, [T] * B), targets


def _our_logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Every position's logits from the inference forward (KV cache), (B, T, V)."""
    ids, b, _ = _packed(batch)
    out = model(ids, b, model.new_cache(256), logits_at=torch.arange(ids.numel()))
    return out.view(*batch.shape, -1)


def _hf(ckpt: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float64)


def _peft_config(cfg: LoraConfig) -> Any:
    import peft

    targets = "all-linear" if "all-linear" in cfg.targets else list(cfg.targets)  # peft wants the bare string
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _peft_lora(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter tensors under its saved names (`.default` dropped), as `peft_adapter_state` names them."""
    return {k.replace(".default.", "."): v.detach() for k, v in pm.named_parameters() if ".lora_" in k}


@pytest.fixture(scope="module")
def trained(tiny_ckpt: Path) -> SimpleNamespace:
    """Ours and peft's LoRA models from the same A and B, each before and after three AdamW steps."""
    from peft import get_peft_model, set_peft_model_state_dict

    ours = load_model(tiny_ckpt, dtype="float64")
    assert apply_lora(ours, CFG, seed=0) == 2 * 4
    with hf_llama_float64():
        pm = get_peft_model(_hf(tiny_ckpt), _peft_config(CFG))
        assert not set_peft_model_state_dict(pm, peft_adapter_state(ours)).unexpected_keys  # our A, B into peft
        assert _max_diff(_peft_lora(pm), peft_adapter_state(ours)) == 0.0
        logits0 = (_our_logits(ours, BATCH), pm(BATCH).logits.detach())

        ids, b, targets = _packed(BATCH)
        count = int((targets != -100).sum())
        opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
        opt_peft = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            loss = ours.train_forward(ids, b, targets) / count
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad()
            logits = pm(BATCH).logits
            ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), BATCH[:, 1:].reshape(-1))
            ref.backward()
            opt_peft.step()
            opt_peft.zero_grad()
            losses.append((loss.item(), ref.item()))
        logits3 = (_our_logits(ours, BATCH), pm(BATCH).logits.detach())
    return SimpleNamespace(ours=ours, pm=pm, logits0=logits0, logits3=logits3, losses=losses)


def test_logits_and_three_adamw_steps_equal_peft(trained: SimpleNamespace, tiny_ckpt: Path) -> None:
    assert (trained.logits0[0] - trained.logits0[1]).abs().max().item() <= TOL
    assert max(abs(a - b) for a, b in trained.losses) <= TOL
    assert trained.losses[-1][0] < trained.losses[0][0]
    ours = peft_adapter_state(trained.ours)
    assert _max_diff(ours, _peft_lora(trained.pm)) <= TOL  # measured: 0.0
    assert all(v.abs().max() > 0 for k, v in ours.items() if ".lora_B." in k)  # B left zero: it trained
    assert (trained.logits3[0] - trained.logits3[1]).abs().max().item() <= TOL
    # the frozen weights did not move
    base = load_model(tiny_ckpt, dtype="float64").state_dict()
    now = {k.replace(".base.", "."): v for k, v in trained.ours.state_dict().items() if ".lora_" not in k}
    assert _max_diff(now, base) == 0.0


def test_merged_export_and_peft_adapter_load_in_transformers(trained: SimpleNamespace, tiny_ckpt: Path,
                                                             tmp_path: Path) -> None:
    from peft import PeftModel

    merged = merged_state_dict(trained.ours)
    assert not any(".lora_" in k or ".base." in k for k in merged)
    assert merged.keys() == load_model(tiny_ckpt, dtype="float64").state_dict().keys()
    save_hf(tmp_path / "merged", trained.ours.cfg, merged)
    save_peft_adapter(tmp_path / "adapter", CFG, lora_state_dict(trained.ours))
    umask = _umask()  # the weights are as readable as the config beside them (safetensors writes 0600)
    for f in ("merged/model.safetensors", "merged/config.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    with hf_llama_float64():
        want = copy.deepcopy(trained.pm).merge_and_unload()(BATCH).logits
        got = _hf(tmp_path / "merged")(BATCH).logits
        assert (got - want).abs().max().item() <= TOL
        adapter = PeftModel.from_pretrained(_hf(tiny_ckpt), tmp_path / "adapter")
        assert (adapter(BATCH).logits - trained.logits3[1]).abs().max().item() <= TOL
    # our loader reads the merged export back as the LoRA model it came from
    reloaded = load_model(tmp_path / "merged", dtype="float64")
    assert (_our_logits(reloaded, BATCH) - trained.logits3[0]).abs().max().item() <= TOL


def test_checkpoints_round_trip(trained: SimpleNamespace, tiny_ckpt: Path) -> None:
    """A wrapped model's own state dict (a trainer's checkpoint), the adapter alone, and a plain model's
    weights all load into a wrapped model."""
    want = trained.logits3[0]
    full = load_model(tiny_ckpt, dtype="float64")
    apply_lora(full, CFG, seed=1)
    full.load_state_dict(trained.ours.state_dict())
    assert (_our_logits(full, BATCH) - want).abs().max().item() == 0.0

    adapter_only = load_model(tiny_ckpt, dtype="float64")
    apply_lora(adapter_only, CFG, seed=1)
    load_lora_state_dict(adapter_only, lora_state_dict(trained.ours))
    assert (_our_logits(adapter_only, BATCH) - want).abs().max().item() == 0.0
    with pytest.raises(ConfigError, match="missing"):
        load_lora_state_dict(adapter_only, {})

    # a plain checkpoint (`wq.weight`) lands in the wrapped bases; only the adapters are left missing
    missing, unexpected = full.load_state_dict(merged_state_dict(trained.ours), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    assert torch.equal(full.layers["2"].attention.wq.base.weight,
                       trained.ours.layers["2"].attention.wq.merged_weight())


def test_seeded_init_is_the_same_whatever_the_split(tiny_ckpt: Path) -> None:
    cfg = LoraConfig(r=4, alpha=8, targets=("all-linear",))
    whole = load_model(tiny_ckpt, dtype="float64")
    assert apply_lora(whole, cfg, seed=7) == 4 * 7
    want = lora_state_dict(whole)
    for split in ([[0, 1], [2, 3]], [[0], [1], [2], [3]]):
        got: dict[str, torch.Tensor] = {}
        for i, layers in enumerate(split):
            stage = load_stage(tiny_ckpt, layers, dtype="float64", embed=i == 0, head=i == len(split) - 1)
            assert apply_lora(stage, cfg, seed=7) == len(layers) * 7
            got.update(lora_state_dict(stage))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    a = [v for k, v in want.items() if ".lora_A." in k]
    assert all(0 < v.abs().max() <= v.shape[1] ** -0.5 for v in a)  # kaiming-uniform(a=sqrt(5)): 1/sqrt(fan_in)
    assert len({v.sum().item() for v in a}) == len(a)  # every module its own draw
    assert all(not v.any() for k, v in want.items() if ".lora_B." in k)
    other = load_stage(tiny_ckpt, [0], dtype="float64", head=False)
    apply_lora(other, cfg, seed=8)
    assert not torch.equal(lora_state_dict(other)["layers.0.attention.wq.lora_A.weight"],
                           want["layers.0.attention.wq.lora_A.weight"])
    head_only = load_stage(tiny_ckpt, [], dtype="float64", embed=False, head=True)
    assert apply_lora(head_only, cfg, seed=7) == 0 and lora_state_dict(head_only) == {}


def test_unseeded_init_draws_what_peft_draws(tiny_ckpt: Path) -> None:
    """Without a seed, A comes from torch's global RNG in peft's order and dtype: the same A as peft's."""
    from peft import get_peft_model

    cfg = LoraConfig(r=4, alpha=8, targets=("all-linear",))
    torch.manual_seed(3)
    pm = get_peft_model(_hf(tiny_ckpt), _peft_config(cfg))
    ours = load_model(tiny_ckpt, dtype="float64")
    torch.manual_seed(3)
    apply_lora(ours, cfg)
    assert _max_diff(peft_adapter_state(ours), _peft_lora(pm)) == 0.0


def test_only_lora_parameters_train(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    n = apply_lora(model, LoraConfig(r=2, targets=("o_proj", "gate_proj", "down_proj")))
    assert n == 3 * 4
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * n
    wrapped = model.layers["1"]
    assert isinstance(wrapped.attention.wo, LoraLinear) and isinstance(wrapped.feed_forward.w2, LoraLinear)
    assert not isinstance(wrapped.attention.wq, LoraLinear) and not isinstance(wrapped.feed_forward.w3, LoraLinear)
    assert wrapped.attention.wo.lora_A.weight.dtype == torch.float64
    with pytest.raises(ConfigError, match="already"):
        apply_lora(model, LoraConfig())


@pytest.mark.parametrize(("data", "names"), [
    ({"targets": ["q_proj", "qkv"]}, ["'qkv'", "v_proj", "all-linear"]),
    ({"targets": []}, ["targets", "q_proj"]),
    ({"r": 0}, ["r=0", ">= 1"]),
    ({"r": 2.5}, ["r=2.5", "integer"]),
    ({"alpha": 0}, ["alpha=0", "> 0"]),
    ({"dropout": 1}, ["dropout=1", "[0, 1)"]),
    ({"rank": 8}, ["unknown", "'rank'", "alpha"]),
])
def test_bad_configs_say_what_to_give(data: dict, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        LoraConfig.from_dict(data)
    assert all(n in str(err.value) for n in names), str(err.value)


def test_config_from_dict() -> None:
    cfg = LoraConfig.from_dict({"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"})
    assert cfg == LoraConfig(16, 32, 0.05, ("all-linear",)) and cfg.scaling == 2.0
    assert cfg.modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert LoraConfig.from_dict({}).targets == ("q_proj", "v_proj")


def test_lora_linear_dropout_acts_in_training_only_and_merges() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(16, 8, bias=False).double(), r=2, alpha=4, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16, dtype=torch.float64)
    plain = x @ layer.merged_weight().T
    assert (layer.eval()(x) - plain).abs().max().item() <= 1e-12
    assert (layer.train()(x) - plain).abs().max().item() > 1e-3
