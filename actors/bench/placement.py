"""Benchmark of `topology.placement.place` (through `actors.layout.place`): time of the DP, checked against brute force when small.

`meshpipe bench placement [--seed N]` prints one JSON line per case.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence

from actors.layout import cost_model, place
from models.config import ModelConfig
from models.errors import ConfigError
from topology.placement import GIB, Gpu

log = logging.getLogger(__name__)

SMOLLM2_135M = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                           tie_embeddings=True)  # SmolLM2-135M's shape
LLAMA_70B_LIKE = ModelConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                             hidden_dim=28672, tie_embeddings=False)  # Llama-3-70B's shape


def brute_force(cfg: ModelConfig, gpus: Sequence[Gpu], num_stages: int | None = None,
                bytes_per_param: int = 4, kv_bytes_per_layer: float = 0.0) -> tuple[float, float] | None:
    """(slowest stage time, total time) of the best placement over every contiguous split and every
    ordered choice of distinct GPUs; None when nothing fits. Exponential: small cases only."""
    model = cost_model(cfg, bytes_per_param, kv_bytes_per_layer)
    n = cfg.n_layers
    best: tuple[float, float] | None = None
    for k in [num_stages] if num_stages else range(1, min(n, len(gpus)) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *cuts, n]
            ranges = list(zip(bounds, bounds[1:]))
            mems = [model.memory(i, j) for i, j in ranges]
            costs = [model.cost(i, j) for i, j in ranges]
            for chosen in itertools.permutations(gpus, k):
                if any(m > g.memory_bytes for m, g in zip(mems, chosen)):
                    continue
                times = [c / g.speed for c, g in zip(costs, chosen)]
                key = (max(times), sum(times))
                if best is None or key[0] < best[0] or (key[0] == best[0] and key[1] < best[1]):
                    best = key
    return best


def _tiny(rng: random.Random, n: int) -> ModelConfig:
    return ModelConfig(vocab_size=rng.choice([16, 128, 1024]), dim=16, n_layers=n, n_heads=2, n_kv_heads=1,
                       hidden_dim=rng.choice([16, 64]), tie_embeddings=rng.random() < 0.5)


def _random_gpus(rng: random.Random, cfg: ModelConfig, g: int, types: int) -> list[Gpu]:
    layer, emb = cfg.layer_params() * 4, cfg.embedding_params() * 4
    kinds = [(rng.uniform(1.5, 5) * layer + emb if rng.random() < 0.8 else math.inf,
              rng.choice([1.0, 2.0, 3.5])) for _ in range(types)]
    return [Gpu(f"host{i // 2}", i % 2, *kinds[i % types]) for i in range(g)]


def _cluster(spec: Sequence[tuple[int, int, float, float]]) -> list[Gpu]:
    """GPUs of (hosts, gpus per host, GiB each, TFLOPS) groups; host names say the kind."""
    gpus = []
    for kind, (hosts, per_host, gib, tflops) in enumerate(spec):
        gpus += [Gpu(f"k{kind}-h{h}", i, gib * GIB * 0.9, tflops)
                 for h in range(hosts) for i in range(per_host)]
    return gpus


def _record(cfg: ModelConfig, gpus: list[Gpu], num_stages: int | None, bytes_per_param: int, brute: bool,
            case: str) -> dict:
    t0 = time.perf_counter()
    try:
        result = place(cfg, gpus, num_stages, bytes_per_param)
        got: tuple[float, float] | None = (max(p.time for p in result), sum(p.time for p in result))
    except ConfigError:
        result, got = [], None
    dp_ms = (time.perf_counter() - t0) * 1e3
    log.debug("placement bench %s: %d layers, %d GPUs, DP %.1f ms", case, cfg.n_layers, len(gpus), dp_ms)
    brute_ms = same = None
    if brute:
        t0 = time.perf_counter()
        ref = brute_force(cfg, gpus, num_stages, bytes_per_param)
        brute_ms = (time.perf_counter() - t0) * 1e3
        same = (ref is None and got is None) or (ref is not None and got is not None and all(
            math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, ref)))
    return {
        "bench": "placement", "case": case, "layers": cfg.n_layers, "gpus": len(gpus),
        "types": len({(g.memory_bytes, g.speed) for g in gpus}), "num_stages": num_stages,
        "dp_ms": round(dp_ms, 3), "brute_ms": None if brute_ms is None else round(brute_ms, 3),
        "same_optimum": same,  # (slowest, total) equal to brute force's; None: not checked (too big)
        "max_stage_time": got[0] if got else None, "total_time": got[1] if got else None,
        "stages": len(result),
        "host_changes": sum(a.gpu.host != b.gpu.host for a, b in zip(result, result[1:])),
    }


def bench_placement(seed: int = 0) -> Iterator[dict]:
    """JSON-able records: small random cases against brute force, then realistic clusters."""
    rng = random.Random(seed)
    for n, g in itertools.product((6, 7, 8), (3, 4, 5)):
        cfg = _tiny(rng, n)
        gpus = _random_gpus(rng, cfg, g, rng.randint(1, 3))
        yield _record(cfg, gpus, rng.choice([None, min(n, g)]), 4, True, "random-small")
    cfg = _tiny(rng, 10)
    yield _record(cfg, _random_gpus(rng, cfg, 6, 3), None, 4, True, "random-medium")
    smol_gpus = _cluster([(1, 4, 8, 80.0), (2, 2, 2, 30.0)])  # 4 fast + 4 slow small GPUs
    yield _record(SMOLLM2_135M, smol_gpus, None, 4, False, "smollm2-8gpu-2types")
    yield _record(SMOLLM2_135M, smol_gpus, 4, 4, False, "smollm2-8gpu-2types")
    three_kinds = _cluster([(1, 3, 4, 80.0), (1, 3, 1, 40.0), (2, 2, 0.3, 20.0)])
    yield _record(SMOLLM2_135M, three_kinds, None, 4, False, "smollm2-10gpu-3types")
    big = _cluster([(2, 8, 80, 989.0), (4, 8, 40, 312.0), (2, 8, 24, 121.0)])  # H100, A100-40G, L4 hosts
    for k in (None, 16, 64):
        yield _record(LLAMA_70B_LIKE, big, k, 2, False, "70b-64gpu-3types")
    yield _record(LLAMA_70B_LIKE, _cluster([(8, 8, 80, 989.0)]), None, 2, False, "70b-64gpu-homogeneous")
