"""`meshpipe bench train`: tokens/s of training through the stage actors (S stages x D copies) beside
one-process training of the same model, on the same batches, in the same run; and each pipeline's
measured bubble fraction beside the theoretical (S - 1) / (M + S - 1).

One row per configuration: `{"bench": "train", "mode": "one-process" | "pipeline", "stages", "copies",
"micro_batches", "tokens_per_s", "step_s", "bubble", "theoretical_bubble", "loss", ...}`. The first step
of each is a warm-up (not timed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from models import Batch, load_model


def one_process(model: str, batches: list[torch.Tensor], dtype: str, lr: float, lora: dict | None,
                threads: int) -> dict[str, Any]:
    """The whole model in this process: the same loss, optimizer and batches (the baseline)."""
    torch.set_num_threads(threads)
    m = load_model(model, dtype=dtype).train()
    if lora is not None:
        from models.lora import LoraConfig, apply_lora

        apply_lora(m, LoraConfig.from_dict(lora), seed=0)
    else:
        for p in m.parameters():
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    times, losses = [], []
    for ids in batches:
        t0 = time.perf_counter()
        rows, cols = ids.shape
        targets = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], 1).reshape(-1)
        loss = m.train_forward(ids.reshape(-1), Batch.build([str(i) for i in range(rows)], [0] * rows, [cols] * rows),
                               targets) / int((targets != -100).sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return _row("one-process", batches, times[1:], losses, 1, 1, 1)


def pipeline(model: str, batches: list[torch.Tensor], dtype: str, lr: float, lora: dict | None, stages: int,
             copies: int, micro_batches: int) -> dict[str, Any]:
    from actors.trainer import PipelineTrainer

    tr = PipelineTrainer.deploy(model, num_stages=stages, data_parallel=copies, micro_batches=micro_batches,
                                optimizer={"name": "adamw", "lr": lr}, lora=lora, dtype=dtype,
                                seq_len=batches[0].shape[1], name=f"bench-train-{stages}x{copies}")
    try:
        results = [tr.step(b) for b in batches]
    finally:
        tr.shutdown()
    timed = results[1:]
    row = _row("pipeline", batches, [r.seconds for r in timed], [r.loss for r in results], stages, copies,
               micro_batches)
    row["bubble"] = sum(r.bubble for r in timed) / len(timed)
    row["theoretical_bubble"] = timed[0].theoretical_bubble
    return row


def _row(mode: str, batches: list[torch.Tensor], times: list[float], losses: list[float], stages: int,
         copies: int, micro_batches: int) -> dict[str, Any]:
    tokens = int(batches[0].shape[0] * (batches[0].shape[1] - 1))
    step = sum(times) / len(times)
    return {"bench": "train", "mode": mode, "stages": stages, "copies": copies, "micro_batches": micro_batches,
            "tokens_per_step": tokens, "step_s": step, "tokens_per_s": tokens / step, "losses": losses}


def bench_train(model: str, stages: int = 2, copies: tuple[int, ...] = (1, 2), micro_batches: int = 4,
                steps: int = 3, batch_size: int = 8, seq_len: int = 64, dtype: str = "float32", lr: float = 1e-4,
                lora: dict | None = None) -> Iterator[dict[str, Any]]:
    """The one-process row, then one pipeline row per copy count; all train on the same batches."""
    from actors.bench.pipeline import machine
    from models.loading import read_config, resolve_source

    cfg_vocab = read_config(resolve_source(model)).vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, cfg_vocab, (batch_size, seq_len), generator=gen) for _ in range(steps + 1)]
    info = {"model": str(model), "dtype": dtype, "lora": lora, "machine": machine()}
    base = one_process(model, batches, dtype, lr, lora, threads=torch.get_num_threads())
    yield {**base, **info}
    for d in copies:
        row = pipeline(model, batches, dtype, lr, lora, stages, d, micro_batches)
        row["vs_one_process"] = row["tokens_per_s"] / base["tokens_per_s"]
        yield {**row, **info}
