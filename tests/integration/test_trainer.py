"""Training through stage actors against transformers trained in one process (float64, tiny checkpoints):
the same losses, and after three AdamW steps the same parameters, whatever the stages and schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from actors.trainer import PipelineTrainer
from models import ConfigError
from models.loading import _source_name
from tests.checkpoints import make_tiny_llama

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _reference_steps(ckpt: Path, batch: torch.Tensor, steps: int, lr: float,
                     clip: float | None = None) -> tuple[list[float], dict]:
    """transformers' model trained in one process, its RMSNorm and RoPE tables computed in the model's
    float64 (transformers computes both in float32 whatever the dtype: that alone moves the loss ~1e-6)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama as hf_llama

    def norm(self, h: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        dim = self.inv_freq.numel() * 2
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        emb = torch.cat([position_ids[..., None].double() * inv_freq] * 2, dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    saved = hf_llama.LlamaRMSNorm.forward, hf_llama.LlamaRotaryEmbedding.forward
    hf_llama.LlamaRMSNorm.forward, hf_llama.LlamaRotaryEmbedding.forward = norm, rope
    try:
        return _train_reference(LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float64), batch, steps, lr,
                                clip)
    finally:
        hf_llama.LlamaRMSNorm.forward, hf_llama.LlamaRotaryEmbedding.forward = saved


def _train_reference(hf: torch.nn.Module, batch: torch.Tensor, steps: int, lr: float,
                     clip: float | None) -> tuple[list[float], dict]:
    opt = torch.optim.AdamW(hf.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = hf(batch).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in hf.state_dict().items()}


def _max_param_diff(ours: dict, theirs: dict) -> float:
    return max((v - theirs[_source_name(k, 1)]).abs().max().item() for k, v in ours.items())


@pytest.mark.parametrize(("stages", "schedule"), [(2, "1f1b"), (2, "gpipe"), (4, "1f1b"), (4, "gpipe")])
def test_three_adamw_steps_equal_transformers(tiny_ckpt: Path, stages: int, schedule: str) -> None:
    batch = torch.randint(3, 250, (8, 12), generator=torch.Generator().manual_seed(stages))
    want_losses, want = _reference_steps(tiny_ckpt, batch, 3, 1e-3)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=stages, schedule=schedule, micro_batches=4,
                                optimizer={"name": "adamw", "lr": 1e-3}, dtype="float64", name=f"tr-{stages}-{schedule}")
    try:
        before = tr.evaluate(batch)
        got = [tr.step(batch) for _ in range(3)]
        assert abs(before - want_losses[0]) < 1e-9  # evaluate: the loss of the current weights, no update
        assert [r.micro_batches for r in got] == [4] * 3 and got[0].tokens == 8 * 11
        assert got[0].theoretical_bubble == pytest.approx((stages - 1) / (4 + stages - 1))
        assert all(0.0 <= r.bubble < 1.0 and r.seconds > 0 for r in got)
        assert max(abs(r.loss - w) for r, w in zip(got, want_losses)) < 1e-9
        assert _max_param_diff(tr.state_dict(), want) <= 1e-9  # measured: ~5e-15
    finally:
        tr.shutdown()


def test_tied_embeddings_stay_tied_and_train_as_one_with_a_global_gradient_clip(tmp_path: Path) -> None:
    """The tie holds, and clipping by the global norm (the tied tensor counted once, as in one process)
    gives transformers' clip_grad_norm_ result: 0.5 is well under this batch's gradient norm."""
    ckpt = make_tiny_llama(tmp_path / "tied", tie=True)
    batch = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(7))
    _, want = _reference_steps(ckpt, batch, 2, 1e-2, clip=0.5)
    tr = PipelineTrainer.deploy(str(ckpt), num_stages=2, micro_batches=2, optimizer={"name": "adamw", "lr": 1e-2},
                                dtype="float64", name="tr-tied", grad_clip=0.5)
    try:
        for _ in range(2):
            tr.step(batch)
        ours = tr.state_dict()
        assert torch.equal(ours["tok_embeddings.weight"], ours["output.weight"])
        assert _max_param_diff({k: v for k, v in ours.items() if k != "output.weight"}, want) <= 1e-9
    finally:
        tr.shutdown()


def test_fit_packs_the_data_the_loss_falls_and_the_export_loads_in_transformers(tiny_ckpt: Path,
                                                                                 tmp_path: Path) -> None:
    """A repetitive token stream, packed in 16-token windows: 12 AdamW steps take the training and the
    held-out loss well down; the exported folder gives transformers' logits of the trained weights."""
    docs = [[5, 6, 7, 8, 9, 10, 11, 12] * 12 for _ in range(4)]
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, micro_batches=2, seq_len=16,
                                optimizer={"name": "adamw", "lr": 1e-2}, name="tr-fit")
    try:
        history = tr.fit(docs, steps=12, batch_size=4, held_out=0.2, eval_every=6)
        assert [h["step"] for h in history] == list(range(1, 13)) and "eval_loss" in history[5]
        assert history[-1]["loss"] < 0.5 * history[0]["loss"]
        assert history[-1]["eval_loss"] < 0.5 * history[0]["loss"]
        folder = tr.export(str(tmp_path / "trained"))  # transformers and our loader read the same model
        from transformers import LlamaForCausalLM

        from models import Batch, load_model

        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        ours = load_model(folder, dtype="float32")
        got = ours(ids[0], Batch.build(["s"], [0], [6]), ours.new_cache(64))[0]
        assert (hf(ids).logits[0, -1] - got).abs().max().item() < 1e-4
        assert (got - load_model(tiny_ckpt, dtype="float32")(ids[0], Batch.build(["s"], [0], [6]),
                                                           ours.new_cache(64))[0]).abs().max().item() > 1e-3
    finally:
        tr.shutdown()


def test_save_and_resume_continue_as_if_never_stopped(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Two steps, save, shut down, resume, one more step: the weights of three steps in one run."""
    batch = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(11))
    opts = {"num_stages": 2, "micro_batches": 2, "optimizer": {"name": "adamw", "lr": 1e-2}, "dtype": "float64"}
    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-whole", **opts)
    try:
        for _ in range(3):
            tr.step(batch)
        want = tr.state_dict()
    finally:
        tr.shutdown()
    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-part", **opts)
    try:
        tr.step(batch)
        tr.step(batch)
        folder = tr.save(str(tmp_path / "ckpt"))
    finally:
        tr.shutdown()
    tr = PipelineTrainer.resume(folder, name="tr-resumed")
    try:
        assert tr.steps == 2
        tr.step(batch)
        got = tr.state_dict()
        assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0
    finally:
        tr.shutdown()
    with pytest.raises(ConfigError, match="no trainer checkpoint"):
        PipelineTrainer.resume(str(tmp_path))


def test_bad_training_input_is_refused_by_name(tiny_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="micro_batches"):
        PipelineTrainer.deploy(str(tiny_ckpt), micro_batches=0)
    with pytest.raises(ConfigError, match="seq_len"):
        PipelineTrainer.deploy(str(tiny_ckpt), seq_len=10_000)
    with pytest.raises(ConfigError, match="grad_clip"):
        PipelineTrainer.deploy(str(tiny_ckpt), grad_clip=0)
    with pytest.raises(ConfigError, match="schedule"):
        PipelineTrainer.deploy(str(tiny_ckpt), schedule="zb")
