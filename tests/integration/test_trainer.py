"""Training through stage actors against transformers trained in one process (float64, tiny checkpoints):
the same losses, and after three AdamW steps the same parameters, whatever the stages and schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
import torch.nn.functional as F

from actors.errors import DeploymentError, InsufficientResourcesError, StageFailedError
from actors.layout import partition
from actors.trainer import EVAL_TOKENS, MAX_REDOS, PipelineTrainer
from models import ConfigError, InvalidRequestError
from models.loading import _source_name, read_config
from tests.checkpoints import make_tiny_llama
from tests.hf_float64 import hf_llama_float64

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _reference_steps(ckpt: Path, batch: torch.Tensor, steps: int, lr: float,
                     clip: float | None = None) -> tuple[list[float], dict]:
    """transformers' model trained in one process, its RMSNorm and RoPE tables computed in the model's
    float64 (transformers computes both in float32 whatever the dtype: that alone moves the loss ~1e-6)."""
    from transformers import LlamaForCausalLM

    with hf_llama_float64():
        return _train_reference(LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float64), batch, steps, lr,
                                clip)


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


@pytest.mark.parametrize(("stages", "copies", "schedule"),
                         [(2, 1, "1f1b"), (2, 1, "gpipe"), (4, 1, "1f1b"), (4, 1, "gpipe"),
                          (2, 2, "1f1b"), (2, 2, "gpipe"), (4, 2, "1f1b"), (4, 2, "gpipe")])
def test_three_adamw_steps_equal_transformers(tiny_ckpt: Path, stages: int, copies: int, schedule: str) -> None:
    """S stages x D data-parallel copies (gloo all-reduce), M = 4 micro-batches a copy: the same losses and,
    after three steps, the same parameters as one process."""
    batch = torch.randint(3, 250, (8, 12), generator=torch.Generator().manual_seed(stages))
    want_losses, want = _reference_steps(tiny_ckpt, batch, 3, 1e-3)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=stages, data_parallel=copies, schedule=schedule,
                                micro_batches=4, optimizer={"name": "adamw", "lr": 1e-3}, dtype="float64",
                                name=f"tr-{stages}-{copies}-{schedule}")
    try:
        before = tr.evaluate(batch)
        got = [tr.step(batch) for _ in range(3)]
        assert abs(before - want_losses[0]) < 1e-9  # evaluate: the loss of the current weights, no update
        assert [r.micro_batches for r in got] == [4 * copies] * 3 and got[0].tokens == 8 * 11
        assert got[0].theoretical_bubble == pytest.approx((stages - 1) / (4 + stages - 1))
        assert all(0.0 <= r.bubble < 1.0 and r.seconds > 0 for r in got)
        assert max(abs(r.loss - w) for r, w in zip(got, want_losses)) < 1e-9
        assert _max_param_diff(tr.state_dict(), want) <= 1e-9  # measured: ~5e-15
        names = [st["name"] for row in tr.stats() for st in row]
        assert names == [f"meshpipe/tr-{stages}-{copies}-{schedule}/copy-{d}/train-stage-{s}"
                         for d in range(copies) for s in range(stages)]
    finally:
        tr.shutdown()


def _undisturbed(ckpt: Path, name: str, batch: torch.Tensor, opts: dict, steps: int = 3) -> tuple[list, dict]:
    """The losses and final weights of `steps` steps without faults (what a faulty run must end with)."""
    tr = PipelineTrainer.deploy(str(ckpt), name=name, **opts)
    try:
        return [tr.step(batch).loss for _ in range(steps)], tr.state_dict()
    finally:
        tr.shutdown()


def test_a_stage_killed_mid_step_is_replaced_and_the_run_ends_with_the_undisturbed_weights(tiny_ckpt: Path) -> None:
    """Copy 1's stage 1 dies at micro-batch 1 of step 2 (its process exits): a replacement joins, every stage
    returns to the step-1 boundary kept in the object store, and the step is redone. Corrupted messages on
    the way are resent. Same weights as a run without faults, to the bit."""
    batch = torch.randint(3, 250, (8, 12), generator=torch.Generator().manual_seed(3))
    opts = {"num_stages": 2, "data_parallel": 2, "micro_batches": 2, "dtype": "float64",
            "optimizer": {"name": "adamw", "lr": 1e-2}, "lr_schedule": {"name": "cosine", "warmup": 1, "total": 4}}
    calm, want = _undisturbed(tiny_ckpt, "tr-calm", batch, opts)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-faulty", **opts)
    try:
        first = tr.step(batch)
        victim = tr.grid[1][1]
        tr.inject(1, "crash", micro=1, copy=1)
        tr.inject(0, "corrupt", count=2)  # copy 0's activations fail their checksum twice: resent
        second = tr.step(batch)
        assert second.redone == 1 and tr.grid[1][1] is not victim
        third = tr.step(batch)
        assert [first.loss, second.loss, third.loss] == calm
        assert [r.lr for r in (first, second, third)] == pytest.approx([1e-2, 1e-2 * 0.75, 1e-2 * 0.25])
        got = tr.state_dict()
        assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0
        stats = tr.stats()
        assert sum(st["retransmits_asked"] for st in stats[0]) >= 1
        assert [st["kept_for_resend"] for row in stats for st in row] == [0] * 4  # dropped at each step's end
    finally:
        tr.shutdown()


def test_a_stage_killed_during_evaluation_is_replaced_and_the_evaluation_redone(tiny_ckpt: Path) -> None:
    """A stage dying mid-evaluation (fit's held-out loss) is healed as one dying mid-step is: replaced, every
    stage back at the boundary (the weights between steps), the evaluation redone. Same loss, and the run
    goes on with the undisturbed weights."""
    batch = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(13))
    opts = {"num_stages": 2, "micro_batches": 2, "dtype": "float64", "optimizer": {"name": "adamw", "lr": 1e-2}}
    calm, want = _undisturbed(tiny_ckpt, "tr-calm-eval", batch, opts, steps=2)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-eval-crash", **opts)
    try:
        got = [tr.step(batch).loss]
        before = tr.evaluate(batch)
        victim = tr.grid[0][1]
        tr.inject(1, "crash", micro=0)
        assert tr.evaluate(batch) == before  # before: ActorDiedError ended the run
        assert tr.grid[0][1] is not victim and tr.redone == 1
        got.append(tr.step(batch).loss)
        assert got == calm
        w = tr.state_dict()
        assert max((w[k] - want[k]).abs().max().item() for k in want) == 0.0
    finally:
        tr.shutdown()


def test_a_step_failing_every_redo_leaves_the_stages_at_the_boundary(tiny_ckpt: Path) -> None:
    """Step 2 loses a peer (gloo's connection reset, raised in the driver after the backward, before the
    optimizer step) on every attempt: StageFailedError, with every stage back at step 1's boundary, so the
    retried step applies its gradients once (before: the last attempt's gradients stayed and were added
    again, SGD moved twice as far). If the stages cannot be returned, the trainer refuses to go on."""
    batch = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(1))
    opts = {"num_stages": 2, "micro_batches": 2, "dtype": "float64", "optimizer": {"name": "sgd", "lr": 0.1}}
    calm, want = _undisturbed(tiny_ckpt, "tr-calm-flaky", batch, opts, steps=2)

    def lost_peer(*_: object) -> None:
        raise ray.exceptions.RayTaskError("TrainStage.all_reduce", "Traceback ...",
                                          RuntimeError("gloo: Connection reset by peer"))

    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-flaky", **opts)
    try:
        got = [tr.step(batch).loss]
        tr._lr = lost_peer  # called once a step's gradients sit in the stages
        with pytest.raises(StageFailedError, match=f"step 2 failed {MAX_REDOS + 1} times.*back at step 1"):
            tr.step(batch)
        assert tr.steps == 1 and tr.redone == MAX_REDOS and not tr.broken
        del tr._lr  # the link is back: retry
        got.append(tr.step(batch).loss)
        assert got == calm
        w = tr.state_dict()
        assert max((w[k] - want[k]).abs().max().item() for k in want) == 0.0

        def stuck() -> None:
            raise ray.exceptions.GetTimeoutError("restore timed out")

        tr._lr, tr._rewind = lost_peer, stuck
        with pytest.raises(StageFailedError, match="could not return its stages.*resume its last save"):
            tr.step(batch)
        assert tr.broken
        with pytest.raises(StageFailedError, match="shut it down"):
            tr.evaluate(batch)
    finally:
        tr.shutdown()


def test_a_stage_killed_right_after_a_step_is_replaced_and_the_run_ends_with_the_undisturbed_weights(
        tiny_ckpt: Path) -> None:
    """The step boundary's snapshot is taken after the step: a stage killed before its snapshot landed
    left a boundary it could not return to (the replacement kept the source's weights while the other
    stage went back a step, and training went on with that mixed model). The step now ends only once
    every stage has taken its snapshot."""
    batch = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(2))
    opts = {"num_stages": 2, "micro_batches": 2, "dtype": "float64", "optimizer": {"name": "adamw", "lr": 1e-2}}
    calm, want = _undisturbed(tiny_ckpt, "tr-calm-2", batch, opts)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-killed-after", **opts)
    try:
        got = [tr.step(batch).loss]
        ray.kill(tr.grid[0][1])  # at once, no wait for anything in flight
        got += [tr.step(batch).loss for _ in range(2)]
        assert got == calm and tr.redone == 1
        w = tr.state_dict()
        assert max((w[k] - want[k]).abs().max().item() for k in want) == 0.0
    finally:
        tr.shutdown()


def test_encrypted_links_and_speed_balance_keep_the_gradients_exact(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Every message AES-GCM sealed, and the copies dealt micro-batches by measured speed: still one
    process's parameters."""
    batch = torch.randint(3, 250, (8, 12), generator=torch.Generator().manual_seed(5))
    _, want = _reference_steps(tiny_ckpt, batch, 3, 1e-3)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, data_parallel=2, micro_batches=4, dtype="float64",
                                optimizer={"name": "adamw", "lr": 1e-3}, name="tr-sealed", balance="speed",
                                wire={"encryption": "always", "encryption_key": bytes(range(32))})
    try:
        got = [tr.step(batch) for _ in range(3)]
        assert got[-1].micro_batches == 8
        assert _max_param_diff(tr.state_dict(), want) <= 1e-9
        assert all(v > 0 for v in tr.speeds)
        saved = Path(tr.save(str(tmp_path / "sealed")))  # a raw-bytes key: saved without it (it failed to save)
        assert "encryption_key" not in (saved / "trainer.json").read_text()
    finally:
        tr.shutdown()
    tr = PipelineTrainer.resume(str(saved), name="tr-sealed-again", wire={"encryption_key": bytes(range(32))})
    try:
        assert tr.steps == 3 and _max_param_diff(tr.state_dict(), want) <= 1e-9
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
        history = tr.fit(docs, steps=12, batch_size=4, held_out=0.2, eval_every=5)
        assert [h["step"] for h in history] == list(range(13))
        assert [h["step"] for h in history if "eval_loss" in h] == [0, 5, 10, 12]  # and after the last step
        assert history[-1]["loss"] < 0.5 * history[1]["loss"]
        assert history[-1]["eval_loss"] < 0.5 * history[0]["eval_loss"]  # step 0: before training
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
        tr.save(str(tmp_path / "ckpt"))
        tr.step(batch)
        folder = tr.save(str(tmp_path / "ckpt"))  # replaces step 1's checkpoint whole
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


def test_a_resumed_fit_continues_its_data_stream(tiny_ckpt: Path, tmp_path: Path) -> None:
    """fit 3 steps checkpointing every 2; resume the checkpoint (step 2) and fit 1 more: the third step's
    loss and the weights of the unbroken run (the saved data position draws the same third batch)."""
    docs = [list(range(5, 200))] * 3
    opts = {"num_stages": 2, "micro_batches": 2, "seq_len": 12, "optimizer": {"name": "adamw", "lr": 1e-2},
            "dtype": "float64"}
    ckpt = tmp_path / "fit-ckpt"
    tr = PipelineTrainer.deploy(str(tiny_ckpt), name="tr-fit-whole", **opts)
    try:
        whole = [h["loss"] for h in tr.fit(docs, steps=3, batch_size=2, seed=4, checkpoint_every=2,
                                           checkpoint_dir=str(ckpt))]
        want = tr.state_dict()
    finally:
        tr.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-ckpt"]  # swapped in whole, nothing left over
    tr = PipelineTrainer.resume(str(ckpt), name="tr-fit-resumed")
    try:
        assert tr.steps == 2
        rest = tr.fit(docs, steps=1, batch_size=2, seed=4)
        assert [h["step"] for h in rest] == [3] and rest[0]["loss"] == whole[2]
        got = tr.state_dict()
        assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0
    finally:
        tr.shutdown()


def test_resuming_beside_a_running_trainer_of_the_same_name_says_to_shut_it_down(tiny_ckpt: Path,
                                                                                 tmp_path: Path) -> None:
    """`tr.save(...); PipelineTrainer.resume(...)` while `tr` runs: a DeploymentError naming the fix (before:
    Ray's ActorAlreadyExistsError), `tr` untouched; after `tr.shutdown()` the resume works."""
    batch = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(4))
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, micro_batches=2, dtype="float64",
                                name="tr-alive")
    try:
        tr.step(batch)
        folder = tr.save(str(tmp_path / "ckpt"))
        with pytest.raises(DeploymentError, match="'tr-alive' is still running.*shut it down first"):
            PipelineTrainer.resume(folder)
        tr.step(batch)  # its stages were left alone
    finally:
        tr.shutdown()
    tr = PipelineTrainer.resume(folder)
    try:
        assert tr.steps == 1
    finally:
        tr.shutdown()


def test_layers_per_stage_splits_as_pipeline_deploy_does(tiny_ckpt: Path) -> None:
    """`layers_per_stage=3` on 4 layers: stages of 3 and 1 layers, `partition(cfg, layers_per_stage=3)` as
    `Pipeline.deploy` uses (before: 2 stages balanced by compute, 2 and 2)."""
    tr = PipelineTrainer.deploy(str(tiny_ckpt), layers_per_stage=3, dtype="float64", name="tr-lps")
    try:
        held = [sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
                for sd in ray.get([a.state_dict.remote() for a in tr.stages])]
        assert held == [[0, 1, 2], [3]]
        assert held == [list(sp.layers) for sp in partition(read_config(str(tiny_ckpt)), layers_per_stage=3)]
    finally:
        tr.shutdown()


def test_evaluation_runs_in_bounded_micro_batches_with_the_same_loss(tiny_ckpt: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A held-out split of over 2 x EVAL_TOKENS tokens is evaluated in micro-batches of at most EVAL_TOKENS
    tokens, more of them for more rows (before: `micro_batches` pieces whatever its size, so the last
    stage's logits grew with the data file); the loss is still the mean over every target token, as
    transformers computes it in one process."""
    from transformers import LlamaForCausalLM

    per = EVAL_TOKENS // 12
    big = torch.randint(3, 250, (2 * per + 5, 12), generator=torch.Generator().manual_seed(8))
    with hf_llama_float64(), torch.no_grad():
        hf = LlamaForCausalLM.from_pretrained(tiny_ckpt, torch_dtype=torch.float64)
        logits = torch.cat([hf(rows).logits for rows in big.split(256)])
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), big[:, 1:].reshape(-1)).item()
    sizes: list[tuple[int, int]] = []
    ids_message = PipelineTrainer._ids_message

    def spy(self: PipelineTrainer, ids: torch.Tensor, link: object) -> object:
        sizes.append(tuple(ids.shape))  # one per micro-batch the driver sends into copy 0
        return ids_message(self, ids, link)

    monkeypatch.setattr(PipelineTrainer, "_ids_message", spy)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, micro_batches=2, dtype="float64",
                                name="tr-eval-big")
    try:
        assert abs(tr.evaluate(big) - want) < 1e-9
        assert sizes == [(per, 12), (per, 12), (5, 12)]  # at most EVAL_TOKENS tokens each
        sizes.clear()
        tr.evaluate(big[:8])
        assert sizes == [(8, 12)]  # a small batch: one micro-batch
        assert [st["kept_for_resend"] for st in tr.stats()[0]] == [0, 0]  # nothing kept once it ended
    finally:
        tr.shutdown()


def test_bad_training_input_is_refused_by_name(tiny_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="micro_batches"):
        PipelineTrainer.deploy(str(tiny_ckpt), micro_batches=0)
    with pytest.raises(ConfigError, match="seq_len"):
        PipelineTrainer.deploy(str(tiny_ckpt), seq_len=10_000)
    with pytest.raises(ConfigError, match="grad_clip"):
        PipelineTrainer.deploy(str(tiny_ckpt), grad_clip=0)
    with pytest.raises(ConfigError, match="schedule"):
        PipelineTrainer.deploy(str(tiny_ckpt), schedule="zb")
    with pytest.raises(ConfigError, match="lossy"):
        PipelineTrainer.deploy(str(tiny_ckpt), dtype="float64", wire={"codec": "int8"})
    with pytest.raises(ConfigError, match="lr_schedule"):
        PipelineTrainer.deploy(str(tiny_ckpt), lr_schedule={"name": "step"})
    with pytest.raises(ConfigError, match="wq_proj"):
        PipelineTrainer.deploy(str(tiny_ckpt), lora={"r": 4, "targets": ["wq_proj"]})
    for bad, match in (({"optimizer": {"name": "adamw", "lr": -1}}, "Invalid learning rate"),
                       ({"optimizer": {"name": "adamw", "wd": 0.1}}, "wd"), ({"optimizer": "adamw"}, "optimizer="),
                       ({"dtype": "float17"}, "dtype='float17'"), ({"grad_clip": "1"}, "grad_clip"),
                       ({"lr_schedule": {"name": "cosine", "warmup": "10"}}, "ints >= 0"),
                       ({"lr_schedule": {"name": "cosine", "warmup": 10, "total": 5}}, "total > warmup"),
                       ({"lora": 5}, "lora=5"), ({"wire": "always"}, "wire=")):
        with pytest.raises(ConfigError, match=match):  # before any actor starts (before: a dead actor later)
            PipelineTrainer.deploy(str(tiny_ckpt), **bad)
    with pytest.raises(InsufficientResourcesError, match="40 stage actors"):
        PipelineTrainer.deploy(str(tiny_ckpt), num_stages=4, data_parallel=10)  # 32 logical GPUs
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=1, name="tr-empty")
    try:
        with pytest.raises(InvalidRequestError, match="empty"):
            tr.fit([], steps=1)
        with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 256\)"):
            tr.step([[5, 6, 7], [8, 10_000, 9]])  # before any stage runs (a GPU would assert)
        with pytest.raises(ConfigError, match="checkpoint_dir"):
            tr.fit([list(range(5, 50))], steps=1, checkpoint_every=5)
    finally:
        tr.shutdown()


@pytest.mark.parametrize(("stages", "copies"), [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_lora_training_equals_peft_and_its_adapter_loads_in_peft(tiny_ckpt: Path, tmp_path: Path, stages: int,
                                                                 copies: int) -> None:
    """LoRA (r=4 on q_proj, v_proj; A seeded per layer and module, so every split starts alike) trained in
    S x D actors: after three AdamW steps the merged weights equal peft's on transformers' model trained in
    one process, and the exported adapter gives peft's logits."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from models import load_model
    from models.lora import LoraConfig, apply_lora, peft_adapter_state

    lora = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    batch = torch.randint(3, 250, (8, 12), generator=torch.Generator().manual_seed(9))
    start = load_model(tiny_ckpt, dtype="float64")
    apply_lora(start, LoraConfig.from_dict(lora), seed=0)  # the trainer's init (seed=0)
    with hf_llama_float64():
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_ckpt, torch_dtype=torch.float64),
                            PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        set_peft_model_state_dict(pm, peft_adapter_state(start))
        _train_reference(pm, batch, 3, 1e-2, None)
        want_logits = pm(batch).logits.detach()
        want = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    split = {"layers_per_stage": 1} if stages == 4 else {"num_stages": stages}  # 4 layers: one a stage
    tr = PipelineTrainer.deploy(str(tiny_ckpt), data_parallel=copies, micro_batches=4, lora=lora, **split,
                                optimizer={"name": "adamw", "lr": 1e-2}, dtype="float64", name=f"tr-lora-{stages}-{copies}")
    try:
        assert len(tr.stages) == stages
        for _ in range(3):
            tr.step(batch)
        assert _max_param_diff(tr.state_dict(), want) <= 1e-9
        assert sum(st["trainable"] for st in tr.stats()[0]) == 4 * (4 * (64 + 64) + 4 * (64 + 32))  # A, B of q, v
        folder = tr.export(str(tmp_path / "adapter"), adapter=True)
    finally:
        tr.shutdown()
    with hf_llama_float64():
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_ckpt, torch_dtype=torch.float64),
                                           folder)
        assert (loaded(batch).logits - want_logits).abs().max().item() <= 1e-9
