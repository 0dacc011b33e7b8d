"""Per-token control overhead: a tiny model whose compute is negligible, through the pipeline's public
calls at S = 1, 2, 4 stages, beside the same model in one process (`models.generate_local`), one run.

Overhead = pipeline ms/token − one-process ms/token, batch 1, `ignore_eos=True`, default deploy options.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _best_ms_per_token(fn: Any, new_tokens: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3 / new_tokens


def bench_overhead(stages: Sequence[int] = (1, 2, 4), new_tokens: int = 64, n_layers: int = 8,
                   repeats: int = 3) -> Iterator[dict[str, Any]]:
    """One dict per stage count (and one for the one-process baseline), measured in one Ray session."""
    import ray

    from actors import Pipeline
    from models import generate_local, load_model
    from models.random_checkpoint import save_random_llama

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=max(stages), include_dashboard=False,
                 log_to_driver=False)
    prompt = [1, 5, 9, 13]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = save_random_llama(Path(tmp) / "tiny", n_layers=n_layers, max_seq_len=512)
            model = load_model(ckpt, dtype="float32")
            generate_local(model, prompt, 4, ignore_eos=True)  # warm: torch's first calls are slow
            local = _best_ms_per_token(lambda: generate_local(model, prompt, new_tokens, ignore_eos=True),
                                       new_tokens, repeats)
            yield {"bench": "overhead", "path": "one process", "layers": n_layers, "new_tokens": new_tokens,
                   "ms_per_token": local}
            for s in stages:
                pipe = Pipeline.deploy(str(ckpt), num_stages=s, dtype="float32", name=f"overhead-{s}")
                try:
                    pipe.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm: caches, routes, probes
                    ms = _best_ms_per_token(lambda: pipe.generate(prompt, max_new_tokens=new_tokens,
                                                                  ignore_eos=True), new_tokens, repeats)
                finally:
                    pipe.shutdown()
                # baseline re-measured beside each figure (the machine drifts)
                local = min(local, _best_ms_per_token(
                    lambda: generate_local(model, prompt, new_tokens, ignore_eos=True), new_tokens, 1))
                yield {"bench": "overhead", "path": "pipeline", "stages": s, "layers": n_layers,
                       "new_tokens": new_tokens, "ms_per_token": ms, "one_process_ms_per_token": local,
                       "overhead_ms": ms - local}
    finally:
        if started:
            ray.shutdown()
