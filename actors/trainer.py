"""Training through stage actors: `PipelineTrainer` runs a schedule's plan (`topology.schedule`) over
one actor per stage, forward activations and backward gradients passed stage to stage as Ray objects
(the driver holds only references), and steps each stage's optimizer on its own parameters.

A step's loss is the token-level cross-entropy averaged over every target token of the global batch
(each row predicts its next tokens, as transformers does with `labels=input_ids`), so it does not
depend on the number of stages or micro-batches. With tied embeddings the first and last stages
each hold the tensor and add each other's gradient before stepping, so the tie survives training.

This first part runs one pipeline (data_parallel=1) with AdamW or SGD; LoRA, data parallelism,
checkpoints and export are still to come.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from actors.layout import partition
from actors.naming import NAMESPACE
from models import Batch, ConfigError, load_stage
from models.loading import read_config, resolve_source
from topology.schedule import SCHEDULES, plan, submission_order, theoretical_bubble

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class StepResult:
    loss: float  # the global mean loss of this step's forward pass, before the update
    tokens: int  # target tokens in the batch
    micro_batches: int
    seconds: float = 0.0  # wall time of the step
    bubble: float = 0.0  # measured idle fraction: 1 - stages' compute / (stages x wall time)
    theoretical_bubble: float = 0.0  # (S - 1) / (M + S - 1)


class TrainStage:
    """One stage's layers with gradients, its optimizer, and the micro-batches in flight (a Ray actor)."""

    def __init__(self, source: str, layers: list[int], embed: bool, head: bool, dtype: str,
                 optimizer: dict[str, Any], threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = load_stage(source, layers, dtype, embed=embed, head=head).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        opt = dict(optimizer)
        cls = OPTIMIZERS[opt.pop("name", "adamw")]
        if "betas" in opt:
            opt["betas"] = tuple(opt["betas"])
        self.optimizer = cls([p for p in self.model.parameters()], **opt)
        self.inflight: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # micro -> (input, output)
        self.busy_s = 0.0  # compute since the last optimizer step

    def forward(self, micro: int, x: torch.Tensor, rows: int, cols: int,
                targets: torch.Tensor | None = None, train: bool = True) -> torch.Tensor | float:
        """A micro-batch of `rows` sequences of `cols` tokens: hidden states on, or (last) its summed loss.
        `train=False` (evaluation) keeps nothing for a backward."""
        b = Batch.build([str(i) for i in range(rows)], [0] * rows, [cols] * rows)
        if not train:
            with torch.no_grad():
                out = self.model.train_forward(x, b, targets)
            return float(out) if self.model.is_last else out
        t0 = time.perf_counter()
        inp = None
        if not self.model.is_first:
            inp = x.detach().requires_grad_(True)
            x = inp
        out = self.model.train_forward(x, b, targets)
        self.inflight[micro] = (inp, out)
        self.busy_s += time.perf_counter() - t0
        return float(out.detach()) if self.model.is_last else out.detach()

    def backward(self, micro: int, grad: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor | None:
        """The micro-batch's backward: from its loss x `scale` (last) or the next stage's gradient; returns
        the gradient of its input (None on the first stage)."""
        t0 = time.perf_counter()
        inp, out = self.inflight.pop(micro)
        if self.model.is_last:
            (out * scale).backward()
        else:
            out.backward(grad)
        self.busy_s += time.perf_counter() - t0
        return None if inp is None else inp.grad

    def tied_grad(self) -> torch.Tensor | None:
        """The gradient of this stage's copy of a tied embedding (first: the embedding, last: the head)."""
        w = self.model.tok_embeddings if self.model.is_first else self.model.output
        return None if w is None or w.weight.grad is None else w.weight.grad.clone()

    def add_tied_grad(self, grad: torch.Tensor) -> None:
        w = self.model.tok_embeddings if self.model.is_first else self.model.output
        w.weight.grad += grad

    def grad_sq(self, skip_tied: bool = False) -> float:
        """The sum of squared gradients (a tied head's copy left out: the first stage counts the tensor)."""
        skip = self.model.output.weight if skip_tied and self.model.output is not None else None
        return float(sum((p.grad.double() ** 2).sum() for p in self.model.parameters()
                         if p.grad is not None and p is not skip))

    def scale_grads(self, factor: float) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def step(self) -> float:
        """The optimizer step; returns the seconds this stage computed since the last one."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        busy, self.busy_s = self.busy_s, 0.0
        return busy

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith("rope_")}

    def checkpoint(self) -> dict[str, Any]:
        """This stage's weights and optimizer state (a step boundary)."""
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])


class PipelineTrainer:
    """Trains a model split into stage actors along a schedule's plan; `step(batch)` is one optimizer step."""

    def __init__(self, stages: list[Any], schedule: str, micro_batches: int, seq_len: int, tied: bool,
                 grad_clip: float | None = None, source: str | None = None) -> None:
        self.stages, self.schedule, self.micro_batches, self.seq_len = stages, schedule, micro_batches, seq_len
        self.tied = tied and len(stages) > 1
        self.grad_clip = grad_clip  # global gradient norm over every stage, as torch's clip_grad_norm_
        self.source = source  # the model (its tokenizer and EOS for text data)
        self.config: dict[str, Any] = {}  # what `deploy` was given (`save` keeps it for `resume`)
        self.steps = 0  # optimizer steps taken

    @classmethod
    def deploy(cls, source: str, num_stages: int = 2, schedule: str = "1f1b", micro_batches: int = 4,
               optimizer: dict[str, Any] | None = None, dtype: str = "float32", seq_len: int | None = None,
               name: str = "train", stage_resources: dict[str, Any] | None = None,
               grad_clip: float | None = None) -> PipelineTrainer:
        """Starts one training actor per stage (layers split by compute, as `Pipeline.deploy` does)."""
        import ray

        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule {schedule!r}: choose one of {SCHEDULES}")
        if micro_batches < 1:
            raise ConfigError(f"micro_batches={micro_batches}: give at least 1")
        if grad_clip is not None and not grad_clip > 0:
            raise ConfigError(f"grad_clip={grad_clip}: give a positive norm, or None for no clipping")
        opt = dict(optimizer or {"name": "adamw"})
        if opt.get("name", "adamw") not in OPTIMIZERS:
            raise ConfigError(f"optimizer {opt.get('name')!r}: choose one of {sorted(OPTIMIZERS)}")
        path = str(resolve_source(source))
        cfg = read_config(path)
        if seq_len is not None and not 1 < seq_len <= cfg.max_seq_len:
            raise ConfigError(f"seq_len={seq_len}: give 2..{cfg.max_seq_len} (the model's context)")
        specs = partition(cfg, num_stages)
        resources = stage_resources or {"num_gpus": 1, "num_cpus": 0.25}
        actor = ray.remote(TrainStage)
        stages = [actor.options(name=f"meshpipe/{name}/train-stage-{sp.index}", namespace=NAMESPACE,
                                max_restarts=0, **resources).remote(path, list(sp.layers), sp.embed, sp.head, dtype,
                                                                     opt)
                  for sp in specs]
        tr = cls(stages, schedule, micro_batches, seq_len or cfg.max_seq_len, cfg.tie_embeddings, grad_clip, path)
        tr.config = {"source": path, "num_stages": num_stages, "schedule": schedule, "micro_batches": micro_batches,
                     "optimizer": opt, "dtype": dtype, "seq_len": seq_len, "name": name, "grad_clip": grad_clip,
                     "stage_resources": stage_resources}
        return tr

    def save(self, folder: str) -> str:
        """Weights and optimizer state of every stage and the step count, to `folder` (`resume` reads it)."""
        import json
        from pathlib import Path

        import ray

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for k, state in enumerate(ray.get([st.checkpoint.remote() for st in self.stages])):
            torch.save(state, out / f"stage-{k}.pt")
        (out / "trainer.json").write_text(json.dumps({**self.config, "steps": self.steps}, indent=2))
        return str(out)

    @classmethod
    def resume(cls, folder: str, name: str | None = None) -> PipelineTrainer:
        """A trainer deployed as the saved one was, its stages at the saved weights and optimizer state."""
        import json
        from pathlib import Path

        import ray

        src = Path(folder)
        if not (src / "trainer.json").is_file():
            raise ConfigError(f"{folder} holds no trainer checkpoint (trainer.json): give a folder `save` wrote")
        meta = json.loads((src / "trainer.json").read_text())
        steps = meta.pop("steps")
        if name is not None:
            meta["name"] = name
        tr = cls.deploy(meta.pop("source"), **meta)
        ray.get([st.restore.remote(torch.load(src / f"stage-{k}.pt", weights_only=True))
                 for k, st in enumerate(tr.stages)])
        tr.steps = steps
        return tr

    def _micro_batches(self, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """The batch's micro-batches, each row's next-token targets (packed, -100 after the last), the
        target count."""
        ids = torch.as_tensor(batch, dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
            raise ConfigError(f"a batch is [rows, tokens] with at least 2 tokens a row, got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.seq_len:
            raise ConfigError(f"rows of {ids.shape[1]} tokens are longer than seq_len={self.seq_len}")
        micros = list(torch.tensor_split(ids, min(self.micro_batches, ids.shape[0])))
        targets = [torch.cat([m[:, 1:], torch.full((m.shape[0], 1), -100)], 1).reshape(-1) for m in micros]
        return micros, targets, int(sum((t != -100).sum() for t in targets))

    def evaluate(self, batch: Any) -> float:
        """The mean loss of `batch` with the current weights (no update); perplexity is its exp."""
        import ray

        micros, targets, total = self._micro_batches(batch)
        last = len(self.stages) - 1
        sums = []
        for m, (ids, tg) in enumerate(zip(micros, targets)):
            x: Any = ids.reshape(-1)
            for s, st in enumerate(self.stages):
                x = st.forward.remote(m, x, *ids.shape, tg if s == last else None, False)
            sums.append(x)
        return sum(ray.get(sums)) / total

    def step(self, batch: Any) -> StepResult:
        """One optimizer step on `batch` (token-id rows of equal length, a list or a [B, T] tensor)."""
        import ray

        micros, targets, total = self._micro_batches(batch)
        M = len(micros)
        t0 = time.perf_counter()
        acts: dict[tuple[int, int], Any] = {}
        grads: dict[tuple[int, int], Any] = {}
        losses = []
        last = len(self.stages) - 1
        for s, a in submission_order(plan(self.schedule, len(self.stages), M)):
            m, st = a.micro, self.stages[s]
            rows, cols = micros[m].shape
            if a.kind == "F":
                x = micros[m].reshape(-1) if s == 0 else acts[(s - 1, m)]
                acts[(s, m)] = st.forward.remote(m, x, rows, cols, targets[m] if s == last else None)
                if s == last:
                    losses.append(acts[(s, m)])
            else:
                grads[(s, m)] = st.backward.remote(m, None if s == last else grads[(s + 1, m)], 1.0 / total)
        ray.get([grads[(0, m)] for m in range(M)])
        if self.tied:
            first, lastst = self.stages[0], self.stages[-1]
            g0, gl = first.tied_grad.remote(), lastst.tied_grad.remote()
            ray.get([first.add_tied_grad.remote(gl), lastst.add_tied_grad.remote(g0)])
        if self.grad_clip is not None:  # torch.nn.utils.clip_grad_norm_ over the whole model
            last_i = len(self.stages) - 1
            norm = sum(ray.get([st.grad_sq.remote(self.tied and i == last_i) for i, st in enumerate(self.stages)]))
            factor = min(1.0, self.grad_clip / (norm ** 0.5 + 1e-6))
            ray.get([st.scale_grads.remote(factor) for st in self.stages])
        busy = ray.get([st.step.remote() for st in self.stages])
        wall = time.perf_counter() - t0
        self.steps += 1
        S = len(self.stages)
        return StepResult(sum(ray.get(losses)) / total, total, M, wall, max(0.0, 1.0 - sum(busy) / (S * wall)),
                          theoretical_bubble(S, M))

    def fit(self, data: Any, steps: int, batch_size: int = 8, held_out: float = 0.1, eval_every: int = 0,
            seed: int = 0) -> list[dict[str, float]]:
        """Trains `steps` steps on `data` (a text file, texts or token-id lists: `models.data`), packed in
        `seq_len` windows, `batch_size` windows a step drawn with `seed`; every `eval_every` steps the
        held-out windows' loss too. Returns one record a step: step, loss (and eval_loss)."""
        from models.data import load_documents, pack_windows, split_held_out

        if steps < 1 or batch_size < 1:
            raise ConfigError(f"steps={steps} and batch_size={batch_size} must be at least 1")
        tokenizer, eos = self._tokenizer()
        train, held = split_held_out(pack_windows(load_documents(data), self.seq_len, tokenizer, eos), held_out, seed)
        gen = torch.Generator().manual_seed(seed)
        history: list[dict[str, float]] = []
        for i in range(1, steps + 1):
            rec: dict[str, float] = {"step": i, "loss": self.step(train[torch.randint(len(train), (batch_size,),
                                                                                        generator=gen)]).loss}
            if eval_every and i % eval_every == 0 and len(held):
                rec["eval_loss"] = self.evaluate(held)
            history.append(rec)
        return history

    def _tokenizer(self) -> tuple[Any, int | None]:
        from models.tokenizer import load_tokenizer

        if self.source is None:
            return None, None
        cfg = read_config(self.source)
        return load_tokenizer(resolve_source(self.source)), (cfg.eos_ids[0] if cfg.eos_ids else None)

    def export(self, folder: str) -> str:
        """The trained model as a Hugging Face folder (config.json + safetensors in the training dtype,
        transformers' names; the tokenizer files of an HF source are copied): transformers and
        `Pipeline.deploy` load it."""
        import shutil
        from pathlib import Path

        from models.loading import save_hf

        out = save_hf(folder, read_config(self.source), self.state_dict())
        src = Path(self.source)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if src.is_dir() and (src / name).is_file():
                shutil.copy(src / name, out / name)
        return str(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters under the model's names (a tied head appears as `output.weight` too)."""
        import ray

        out: dict[str, torch.Tensor] = {}
        for sd in ray.get([st.state_dict.remote() for st in self.stages]):
            out.update(sd)
        return out

    def shutdown(self) -> None:
        import ray

        for st in self.stages:
            ray.kill(st)
