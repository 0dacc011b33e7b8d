"""`meshpipe train`: fine-tunes a model through the stage actors (`PipelineTrainer.fit`) with a progress
bar (loss, tokens/s), then writes a Hugging Face folder that `meshpipe generate --model DIR` serves, the
loss history (`history.json`) and its curve (`loss.png`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from actors.cli_helpers import _ensure_model, dashboard_hint, err, local_stage_resources, out
from models import InvalidRequestError
from models.sources import SMOLLM2_NAME

LORA_TARGETS = "q_proj,v_proj"


def train(
    data: Annotated[Path, typer.Option(help="A text file (documents split on blank lines).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the trained model (a Hugging Face folder) goes.")],
    model: Annotated[str, typer.Option(help="A known model name or a Hugging Face folder.")] = SMOLLM2_NAME,
    stages: Annotated[int, typer.Option(min=1, help="Pipeline stages (one actor each).")] = 2,
    data_parallel: Annotated[int, typer.Option(min=1, help="Copies of the pipeline averaging gradients.")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 50,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows a step.")] = 8,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens a window.")] = 128,
    micro_batches: Annotated[int, typer.Option(min=1, help="Micro-batches a copy, a step.")] = 4,
    schedule: Annotated[str, typer.Option(help="1f1b or gpipe.")] = "1f1b",
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-3,
    lora_r: Annotated[int, typer.Option(min=0, help="LoRA rank (0: train every weight).")] = 0,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated module names, or all-linear.")] = LORA_TARGETS,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float64.")] = "float32",
    eval_every: Annotated[int, typer.Option(min=0, help="Held-out loss every N steps and after the last (0: only at the end).")] = 10,
    seed: Annotated[int, typer.Option(help="Data order and LoRA initialisation.")] = 0,
    address: Annotated[str | None, typer.Option(help="An existing Ray cluster (default: local).")] = None,
    name: Annotated[str, typer.Option(help="Training deployment name.")] = "train",
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Save a checkpoint every N steps (0: never).")] = 0,
    checkpoint: Annotated[Path | None, typer.Option(help="Where checkpoints go (default: OUT/checkpoint).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a checkpointed run to --steps in all, with the "
                                                     "checkpoint's deployment options and the same --data, "
                                                     "--batch-size and --seed.")] = None,
) -> None:
    """Fine-tunes a model through stage actors (LoRA or full), then exports it for `meshpipe generate --model`."""
    import ray

    from actors.cli import _init_ray
    from actors.trainer import PipelineTrainer

    if model == SMOLLM2_NAME and resume is None:
        _ensure_model(model)
    if not data.is_file():
        raise InvalidRequestError(f"--data {data} is not a file: give a text file (documents split on blank lines)")
    lora = None
    if lora_r:
        lora = {"r": lora_r, "alpha": 2.0 * lora_r if lora_alpha is None else lora_alpha,
                "targets": [t.strip() for t in lora_targets.split(",") if t.strip()]}
    with err.status("starting Ray ..."):
        _init_ray(address, max(4, stages * data_parallel), dashboard=True)
    dashboard_hint()
    tr = None
    try:
        if resume is not None:
            err.print(f"resuming the run checkpointed in {resume} as {name!r} ...")
            tr = PipelineTrainer.resume(str(resume), name=name)
        else:
            err.print(f"deploying {model} for training: {stages} stages x {data_parallel} copies as {name!r} ...")
            from actors import cli  # the local Ray's CUDA devices: fewer than the stage actors, they share them

            tr = PipelineTrainer.deploy(model, num_stages=stages, data_parallel=data_parallel, schedule=schedule,
                                        micro_batches=micro_batches, optimizer={"name": "adamw", "lr": lr},
                                        lora=lora, dtype=dtype, seq_len=seq_len, name=name, seed=seed,
                                        stage_resources=local_stage_resources(stages * data_parallel,
                                                                              cli._local_cuda))
        todo = steps - tr.steps
        if todo < 1:
            raise InvalidRequestError(f"the checkpoint is at step {tr.steps}, --steps {steps}: give more steps in all")
        history = tr.fit(str(data), steps=todo, batch_size=batch_size, eval_every=eval_every or steps, seed=seed,
                         on_step=_ProgressBar(todo), checkpoint_every=checkpoint_every,
                         checkpoint_dir=str(checkpoint or out_dir / "checkpoint"))
        t0 = time.perf_counter()
        folder = Path(tr.export(str(out_dir)))
        export_s = time.perf_counter() - t0
    finally:
        if tr is not None:
            tr.shutdown()
        ray.shutdown()
    (folder / "history.json").write_text(json.dumps(history, indent=1))
    plot_losses(history, folder / "loss.png")
    first, last = next(h for h in history if "loss" in h), history[-1]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    out.print(f"[bold]trained[/] {todo} step{'s' * (todo != 1)} ({steps} in all): "
              f"loss {first['loss']:.3f} -> {last['loss']:.3f}" + (f", held-out {evals[-1]:.3f}" if evals else ""))
    out.print(f"wrote {folder} ({export_s:.1f} s): model, history.json, loss.png")
    out.print(f"serve it: meshpipe generate --model {folder} --prompt '...'")


class _ProgressBar:
    """A tqdm bar on stderr: loss and tokens/s of each step."""

    def __init__(self, steps: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, unit="step", file=sys.stderr, desc="training")

    def __call__(self, rec: dict[str, Any]) -> None:
        post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens'] / max(rec['seconds'], 1e-9):.0f}"}
        if "eval_loss" in rec:
            post["eval"] = f"{rec['eval_loss']:.3f}"
        self.bar.set_postfix(post)
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """The training loss per step and the held-out loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h for h in history if "loss" in h]
    ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], label="training loss")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats a token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
