"""Layer placement over heterogeneous GPUs (pure code, no Ray): exact against brute force."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from actors.bench.placement import bench_placement
from actors.layout import cost_model, head_cost, partition, place
from models import ConfigError, ModelConfig
from topology import Topology, TopologyError
from topology.placement import GIB, Gpu, StagePlacement, gpus_from_topology

SMOL = ModelConfig()  # the defaults are SmolLM2-135M's shape
INF = math.inf


def tiny(n: int, vocab: int = 64, hidden: int = 32, tie: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, dim=16, n_layers=n, n_heads=2, n_kv_heads=1, hidden_dim=hidden,
                       tie_embeddings=tie)


def brute(cfg: ModelConfig, gpus: list[Gpu], k: int | None, kv: float) -> tuple[float, float] | None:
    """(slowest, total) of the best placement: every contiguous split x every ordered choice of GPUs."""
    m = cost_model(cfg, 4, kv)
    n, best = cfg.n_layers, None
    for s in [k] if k else range(1, min(n, len(gpus)) + 1):
        for cuts in itertools.combinations(range(1, n), s - 1):
            b = [0, *cuts, n]
            for chosen in itertools.permutations(gpus, s):
                if all(m.memory(b[i], b[i + 1]) <= g.memory_bytes for i, g in enumerate(chosen)):
                    times = [m.cost(b[i], b[i + 1]) / g.speed for i, g in enumerate(chosen)]
                    key = (max(times), sum(times))
                    if best is None or key[0] < best[0] or (key[0] == best[0] and key[1] < best[1]):
                        best = key
    return best


def check_valid(cfg: ModelConfig, result: list[StagePlacement], kv: float = 0.0, bpp: int = 4) -> None:
    """Contiguous, covering, embed first, head last, distinct GPUs, within memory, times consistent."""
    weights = cost_model(cfg, bpp)
    assert [i for p in result for i in p.stage.layers] == list(range(cfg.n_layers))
    assert [p.stage.index for p in result] == list(range(len(result)))
    assert [p.stage.embed for p in result] == [True] + [False] * (len(result) - 1)
    assert [p.stage.head for p in result] == [False] * (len(result) - 1) + [True]
    assert len({(p.gpu.host, p.gpu.index) for p in result}) == len(result)
    for p in result:
        i, j = p.stage.layers[0], p.stage.layers[-1] + 1
        assert p.memory_bytes == weights.memory(i, j)
        assert p.memory_bytes + kv * (j - i) <= p.gpu.memory_bytes
        assert p.time == pytest.approx(weights.cost(i, j) / p.gpu.speed)


def random_case(rng: random.Random) -> tuple[ModelConfig, list[Gpu], int | None, float]:
    n, g = rng.randint(1, 7), rng.randint(1, 5)
    cfg = tiny(n, vocab=rng.choice([8, 64, 512]), hidden=rng.choice([8, 32]), tie=rng.random() < 0.5)
    layer, emb = cfg.layer_params() * 4, cfg.embedding_params() * 4
    kinds = [(rng.choice([INF, rng.uniform(0.8, 5) * layer + rng.choice([0, emb])]),
              rng.choice([1.0, 2.0, rng.uniform(0.25, 4)])) for _ in range(rng.randint(1, 3))]
    gpus = [Gpu(f"h{rng.randint(0, 2)}", i, *rng.choice(kinds)) for i in range(g)]
    k = rng.choice([None, None, rng.randint(1, min(n, g))])
    kv = rng.choice([0.0, 0.0, layer / 2])
    return cfg, gpus, k, kv


def test_optimal_against_brute_force() -> None:
    rng = random.Random(1234)
    feasible = infeasible = 0
    for case in range(250):
        cfg, gpus, k, kv = random_case(rng)
        ref = brute(cfg, gpus, k, kv)
        where = f"case {case}: {cfg.n_layers} layers, k={k}, kv={kv}, gpus={gpus}"
        if ref is None:
            with pytest.raises(ConfigError, match="cannot place"):
                place(cfg, gpus, k, kv_bytes_per_layer=kv)
            infeasible += 1
            continue
        result = place(cfg, gpus, k, kv_bytes_per_layer=kv)
        check_valid(cfg, result, kv)
        assert k is None or len(result) == k, where
        assert max(p.time for p in result) == pytest.approx(ref[0], rel=1e-9), where
        assert sum(p.time for p in result) == pytest.approx(ref[1], rel=1e-9), where  # tie-break: total time
        feasible += 1
    assert feasible >= 150 and infeasible >= 10  # both kinds exercised


@pytest.mark.parametrize("cfg", [SMOL, SMOL.replace(tie_embeddings=False), tiny(7)],
                         ids=["tied", "untied", "tiny"])
def test_homogeneous_gpus_give_partitions_cuts(cfg: ModelConfig) -> None:
    gpus = [Gpu(f"h{i // 4}", i % 4, INF, 2.0) for i in range(8)]
    for k in range(1, min(8, cfg.n_layers) + 1):
        result = place(cfg, gpus, num_stages=k)
        assert [p.stage for p in result] == partition(cfg, num_stages=k)
    # any number of stages: the fewest stages that reach the best slowest time, with partition's cuts
    result = place(cfg, gpus)
    best = partition(cfg, num_stages=min(8, cfg.n_layers))
    slowest = max(len(s.layers) + (head_cost(cfg) if s.head else 0) for s in best) / 2.0
    assert max(p.time for p in result) == pytest.approx(slowest)
    assert [p.stage for p in result] == partition(cfg, num_stages=len(result))


def test_homogeneous_with_a_memory_cap_matches_partition() -> None:
    layer, emb = SMOL.layer_params() * 4, SMOL.embedding_params() * 4
    cap = emb + 9 * layer
    result = place(SMOL, [Gpu("a", i, cap, 1.0) for i in range(4)], num_stages=4)
    assert [p.stage for p in result] == partition(SMOL, num_stages=4, stage_memory_bytes=cap)
    check_valid(SMOL, result)


def test_a_faster_gpu_gets_more_layers() -> None:
    result = place(SMOL, [Gpu("a", 0, INF, 1.0), Gpu("a", 1, INF, 3.0)], num_stages=2)
    by_speed = {p.gpu.speed: p for p in result}
    assert len(by_speed[3.0].stage.layers) > len(by_speed[1.0].stage.layers)
    work = {speed: p.time * speed for speed, p in by_speed.items()}  # compute, in layer units
    assert work[3.0] > 2 * work[1.0]  # about 3x the slow GPU's work
    # three GPUs, one 4x faster: it holds the most layers
    result = place(SMOL, [Gpu("a", 0, INF, 1.0), Gpu("b", 0, INF, 4.0), Gpu("c", 0, INF, 1.0)])
    fast = next(p for p in result if p.gpu.speed == 4.0)
    assert len(fast.stage.layers) == max(len(p.stage.layers) for p in result)
    check_valid(SMOL, result)


def test_a_small_memory_gpu_gets_fewer_layers() -> None:
    layer, emb = SMOL.layer_params() * 4, SMOL.embedding_params() * 4
    small = Gpu("a", 1, emb + 5 * layer, 1.0)
    result = place(SMOL, [Gpu("a", 0, INF, 1.0), small], num_stages=2)
    on_small = next(p for p in result if p.gpu == small)
    assert len(on_small.stage.layers) <= 5 and on_small.memory_bytes <= small.memory_bytes
    unlimited = place(SMOL, [Gpu("a", 0, INF, 1.0), Gpu("a", 1, INF, 1.0)], num_stages=2)
    assert min(len(p.stage.layers) for p in unlimited) > 5  # without the cap it would hold more
    check_valid(SMOL, result)


def test_kv_headroom_counts_per_layer() -> None:
    layer, emb = SMOL.layer_params() * 4, SMOL.embedding_params() * 4
    gpus = [Gpu("a", i, emb + 10 * layer, 1.0) for i in range(3)]
    check_valid(SMOL, place(SMOL, gpus, num_stages=3))  # weights alone fit in 3 stages
    result = place(SMOL, gpus, num_stages=3, kv_bytes_per_layer=layer / 4)
    check_valid(SMOL, result, kv=layer / 4)
    assert len(result[0].stage.layers) <= 8  # embedding + 8 * 1.25 layers
    with pytest.raises(ConfigError, match="kv_bytes_per_layer="):  # 5 + 9 + 5 layers < 30
        place(SMOL, gpus, num_stages=3, kv_bytes_per_layer=layer)


def test_nothing_fits_names_the_numbers() -> None:
    gpus = [Gpu("a", i, 50e6, 1.0) for i in range(4)]
    first = SMOL.embedding_params() * 4 + SMOL.layer_params() * 4
    with pytest.raises(ConfigError) as err:
        place(SMOL, gpus)
    msg = str(err.value)
    assert "30 layers" in msg and "biggest GPU holds 0.05 GiB (5e+07 bytes)" in msg
    assert f"{first:.4g} bytes" in msg and "more memory" in msg and "bytes_per_param" in msg
    # each GPU holds a stage, but 2 GPUs are too few for the whole model
    layer, emb = SMOL.layer_params() * 4, SMOL.embedding_params() * 4
    with pytest.raises(ConfigError, match="the model's 30 layers on at most 2 stages over 2 GPUs"):
        place(SMOL, [Gpu("a", i, emb + 10 * layer, 1.0) for i in range(2)])
    with pytest.raises(ConfigError, match="another num_stages"):  # exactly one stage cannot hold it all
        place(SMOL, [Gpu("a", i, emb + 20 * layer, 1.0) for i in range(2)], num_stages=1)


def test_invalid_inputs_name_the_field() -> None:
    gpus = [Gpu("a", 0, INF, 1.0), Gpu("a", 1, INF, 1.0)]
    with pytest.raises(ConfigError, match="gpus is empty"):
        place(SMOL, [])
    for speed in (0.0, -1.0, INF, math.nan):
        with pytest.raises(TopologyError, match="speed"):
            Gpu("a", 0, 1e9, speed)
    with pytest.raises(TopologyError, match="memory_bytes"):
        Gpu("a", 0, -1.0, 1.0)
    with pytest.raises(TopologyError, match="index"):
        Gpu("a", -1, 1e9, 1.0)
    with pytest.raises(ConfigError, match="num_stages=3 is more stages than the 2 GPUs"):
        place(SMOL, gpus, num_stages=3)
    with pytest.raises(ConfigError, match="num_stages=5 is more stages than the model's 4 layers"):
        place(tiny(4), [Gpu("a", i, INF, 1.0) for i in range(6)], num_stages=5)
    for bad in (0, True, 1.5):
        with pytest.raises(ConfigError, match="num_stages"):
            place(SMOL, gpus, num_stages=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="duplicates gpus\\[0\\]"):
        place(SMOL, [gpus[0], gpus[0]])
    with pytest.raises(ConfigError, match="bytes_per_param"):
        place(SMOL, gpus, bytes_per_param=0)
    with pytest.raises(ConfigError, match="kv_bytes_per_layer"):
        place(SMOL, gpus, kv_bytes_per_layer=-1)
    with pytest.raises(ConfigError, match="types"):  # 20 distinct GPUs: 2**20 count vectors
        place(SMOL, [Gpu("a", i, INF, 1.0 + i) for i in range(20)])


def test_consecutive_stages_stay_on_one_host() -> None:
    interleaved = [Gpu(h, i, INF, 1.0) for i in range(2) for h in ("A", "B")]  # A:0, B:0, A:1, B:1
    result = place(SMOL, interleaved, num_stages=4)
    assert [p.gpu.host for p in result] == ["A", "A", "B", "B"]
    # two kinds, one host each, listed mixed: one host change
    mixed = [Gpu("slow", 0, INF, 1.0), Gpu("fast", 0, INF, 3.0),
             Gpu("slow", 1, INF, 1.0), Gpu("fast", 1, INF, 3.0)]
    result = place(SMOL, mixed, num_stages=4)
    hosts = [p.gpu.host for p in result]
    assert sum(a != b for a, b in zip(hosts, hosts[1:])) == 1
    # an 8-stage pipeline over 4 hosts of 2 GPUs: each host holds 2 consecutive stages
    result = place(tiny(8), [Gpu(f"h{h}", i, INF, 1.0) for i in range(2) for h in range(4)], num_stages=8)
    hosts = [p.gpu.host for p in result]
    assert sum(a != b for a, b in zip(hosts, hosts[1:])) == 3


def test_gpus_from_a_heterogeneous_topology() -> None:
    topo = Topology.from_dict({
        "nodes": {"A": {"gpus": 2, "gpu_memory_gb": 24, "tflops": 80}, "B": {"gpus": 1, "gpu_memory_gb": 80},
                  "C": {}, "D": {"gpus": 1}},
        "links": [{"a": "A", "b": "B", "latency_ms": 1}, {"a": "B", "b": "D", "latency_ms": 1}],
    })
    gpus = gpus_from_topology(topo)
    assert gpus == [Gpu("A", 0, 24 * GIB * 0.9, 80.0), Gpu("A", 1, 24 * GIB * 0.9, 80.0),
                    Gpu("B", 0, 80 * GIB * 0.9, 1.0), Gpu("D", 0, INF, 1.0)]
    assert gpus_from_topology(topo, reserve_fraction=0)[0].memory_bytes == 24 * GIB
    with pytest.raises(TopologyError, match="reserve_fraction"):
        gpus_from_topology(topo, reserve_fraction=1.0)
    result = place(SMOL, gpus)
    check_valid(SMOL, result)
    assert {p.gpu.host for p in result} == {"A"}  # the two 80-TFLOPS GPUs beat adding 1-TFLOPS ones


def test_bench_records_are_json_and_match_brute_force() -> None:
    records = list(itertools.islice(bench_placement(seed=3), 4))
    for r in records:
        json.dumps(r)
        assert r["bench"] == "placement" and r["same_optimum"] is True and r["brute_ms"] is not None


def test_topology_errors_reach_users_as_config_errors() -> None:
    from actors.errors import config_error, topology_errors
    from models import MeshpipeError
    from topology import NoRouteError, SplitError, split

    with pytest.raises(ConfigError, match="num_stages=0 must be a positive integer") as err:
        partition(SMOL, num_stages=0)
    assert isinstance(err.value, TopologyError) and isinstance(err.value, MeshpipeError)
    with pytest.raises(SplitError) as err:  # topology alone raises its own errors, not ConfigError
        split(cost_model(SMOL), num_stages=0)
    assert not isinstance(err.value, ConfigError)
    with pytest.raises(NoRouteError) as err, topology_errors():
        raise NoRouteError("no path from 'A' to 'B'")
    assert isinstance(err.value, ConfigError) and str(err.value) == "no path from 'A' to 'B'"
    assert config_error(err.value) is err.value
