"""Inference's fused q|k|v and gate|up matmuls (`models.model.FusedLinears`): the separate linears' outputs
to rounding, one copy of the weights, and never in the way of LoRA, training, reloads or export. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import Batch, generate_local, load_model
from models.loading import save_hf
from models.lora import LoraConfig, apply_lora, merged_state_dict
from models.model import FusedLinears

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 71)), [200]]


# BLAS may sum a wider matmul in another order: MKL's float64 on an AMD EPYC differs by ~1e-13 (other
# machines give the same bits); a weight the fused path failed to follow differs by far more
TOL = {torch.float64: 1e-11, torch.float32: 1e-5}


def _same(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=TOL[x.dtype], atol=TOL[x.dtype]) for x, y in zip(xs, ys, strict=True))


def _fused(model: torch.nn.Module) -> list[FusedLinears]:
    return [f for m in model.modules() for f in vars(m).values() if isinstance(f, FusedLinears)]


def _steps(model: torch.nn.Module) -> list[torch.Tensor]:
    """A packed ragged prefill, then a step where one sequence decodes while another joins, then decodes."""
    cache, out = model.new_cache(), []
    a, b = PROMPTS[0], PROMPTS[2]
    out.append(model(torch.tensor(a), Batch.build(["a"], [0], [len(a)]), cache))
    out.append(model(torch.tensor([7, *b]), Batch.build(["a", "b"], [len(a), 0], [1, len(b)]), cache))
    for i in range(3):
        out.append(model(torch.tensor([3, 4]), Batch.build(["a", "b"], [len(a) + 1 + i, len(b) + i], [1, 1]), cache))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_equals_separate_to_rounding(tiny_ckpt: Path, dtype: str) -> None:
    model = load_model(tiny_ckpt, dtype=dtype)
    model.fuse_linears(False)
    separate = _steps(model)
    tokens = [c.token_ids for c in generate_local(model, PROMPTS, 10, ignore_eos=True)]
    model.fuse_linears(True)
    fused = _steps(model)
    assert all(f.weight is not None for f in _fused(model))  # the fused path ran
    assert _same(separate, fused)
    assert [c.token_ids for c in generate_local(model, PROMPTS, 10, ignore_eos=True)] == tokens


def test_weights_become_views_of_one_tensor(tiny_ckpt: Path) -> None:
    """No second copy: the parameters (the same objects, so optimizers and state dicts still hold them)
    are row views of the fused weight, in output order."""
    model = load_model(tiny_ckpt, dtype="float32")
    attn = model.layers["0"].attention
    params = [attn.wq.weight, attn.wk.weight, attn.wv.weight]
    before = [p.detach().clone() for p in params]
    model.fuse_linears(True)
    model.generate([1, 2, 3], max_new_tokens=2)
    assert [attn.wq.weight, attn.wk.weight, attn.wv.weight] == params  # identity kept
    w = attn.wqkv.weight
    assert all(p.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for p in params)
    assert torch.equal(w, torch.cat(before))
    assert not w.is_inference()  # training may use the parameters afterwards


def test_on_cpu_by_default_nothing_is_fused(tiny_ckpt: Path) -> None:
    """CPU weights stay as loaded (shared zero-copy with the object store in a stage)."""
    model = load_model(tiny_ckpt, dtype="float32")
    model.generate([1, 2, 3], max_new_tokens=2)
    assert all(f.weight is None for f in _fused(model))
    model.fuse_linears(True)  # asked for: the declined default does not stick
    model.generate([1, 2, 3], max_new_tokens=2)
    assert all(f.weight is not None for f in _fused(model))


def test_replaced_or_updated_weights_are_followed(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    model.fuse_linears(True)
    _steps(model)
    # replaced (load_weights assigns new tensors): fused again from the new ones
    state = {k: v.clone() * (0.5 if ".wk." in k or ".w3." in k else 1.0) for k, v in model.state_dict().items()}
    model.load_weights(state)
    after_load = _steps(model)
    model.fuse_linears(False)
    assert _same(after_load, _steps(model))
    # updated in place (an optimizer step, load_state_dict's copy): the views carry it into the fused weight
    model.fuse_linears(True)
    _steps(model)
    with torch.no_grad():
        model.layers["1"].attention.wv.weight.mul_(-1)
        model.layers["1"].feed_forward.w1.weight.add_(0.01)
    fused = _steps(model)
    model.fuse_linears(False)
    assert _same(fused, _steps(model))
    assert not _same(fused[-1:], after_load[-1:])


def test_lora_wrapped_linears_are_never_fused(tiny_ckpt: Path) -> None:
    """A LoRA adapter on q_proj / up_proj takes the separate path: its update is in the output."""
    model = load_model(tiny_ckpt, dtype="float64")
    model.fuse_linears(True)
    base = _steps(model)  # fused, then wrapped: the wrappers hold the (viewed) base weights
    apply_lora(model, LoraConfig(r=2, targets=("q_proj", "up_proj")), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
    with_lora = _steps(model)
    assert not torch.equal(with_lora[-1], base[-1])
    merged = load_model(tiny_ckpt, dtype="float64")
    merged.load_weights(merged_state_dict(model))
    merged.fuse_linears(False)
    assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(with_lora, _steps(merged)))


def test_training_after_fused_inference(tiny_ckpt: Path) -> None:
    """Gradients flow to the (viewed) parameters, and inference afterwards sees the optimizer's step."""
    model = load_model(tiny_ckpt, dtype="float64")
    model.fuse_linears(True)
    _steps(model)
    ids = torch.tensor(PROMPTS[0])
    b = Batch.build(["t"], [0], [len(ids)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model.train_forward(ids, b, targets=torch.roll(ids, -1))
    loss.backward()
    assert model.layers["0"].attention.wk.weight.grad is not None
    opt.step()
    fused = _steps(model)
    model.fuse_linears(False)
    assert _same(fused, _steps(model))


def test_export_after_fused_inference(tiny_ckpt: Path, tmp_path: Path) -> None:
    """save_hf writes fused (storage-sharing) weights as separate tensors, loadable again."""
    model = load_model(tiny_ckpt, dtype="float32")
    model.fuse_linears(True)
    want = _steps(model)
    folder = save_hf(tmp_path / "out", model.cfg, model.state_dict())
    again = load_model(folder, dtype="float32")
    again.fuse_linears(False)
    assert _same(want, _steps(again))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_by_default_on_a_gpu(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float32").to("cuda")
    fused = _steps(model)
    assert all(f.weight is not None and f.weight.is_cuda for f in _fused(model))
    model.fuse_linears(False)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(fused, _steps(model)))
