"""The replay half of `meshpipe bench calibrate`: a real run's setup, re-run in the simulator (no Ray).

The real run (actors/bench/calibrate.py) deploys 2 stages x 2 replicas on two worker nodes of a
3-node Ray cluster on one machine, every step sleeping `step_ms + token_ms x tokens` (emulated
compute) and every message into one replica waiting `slow_ms` (a slow link). Here the same setup is
a `SimCluster`: one speed-1.0 GPU per replica, 1 layer per stage, so

    compute_ms = step_ms + token_ms + overhead_ms       (a 1-token step)
    alpha      = token_ms / compute_ms                  (step = compute_ms x (1 + alpha x (tokens - 1)))
    every hop  = hop_ms (router -> stage 0 -> stage 1 -> router), + slow_ms into the slow replica

`overhead_ms` (the tiny model's compute and the actor call) and `hop_ms` (Ray's per-call latency)
are the free parameters: `fit` grid-searches them on one request mix, minimising the larger
relative error of tokens/s and p50 latency; `agreement` reports the errors on any mix.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from topology.costs import LOAD_KNEE
from topology.graph import Topology
from topology.simulator import ModelShape, Request, SimCluster, build_cluster, poisson_workload, simulate

NODES = ("gpu-a", "gpu-b")  # the worker nodes; the router runs on "head"
OVERHEAD_GRID = tuple(float(x) for x in np.arange(0.0, 60.1, 2.0))  # ms, fitted (a loaded 2-core machine: wide)
HOP_GRID = tuple(float(x) for x in np.arange(0.5, 20.6, 1.0))  # ms, fitted


@dataclass(frozen=True)
class Mix:
    """A fixed request mix: `requests` Poisson arrivals at `rate_per_s`, lengths uniform (inclusive)."""

    name: str
    requests: int
    rate_per_s: float
    prompt_len: tuple[int, int]
    gen_tokens: tuple[int, int]
    seed: int = 0

    def workload(self) -> list[Request]:
        """The seeded requests (one router)."""
        return poisson_workload(self.requests, self.rate_per_s, 1, seed=self.seed, prompt_len=self.prompt_len,
                                gen_tokens=self.gen_tokens)


MIXES = (Mix("fit", 40, 6.0, (4, 24), (8, 24), seed=1), Mix("check", 40, 9.0, (16, 48), (4, 16), seed=2))


@dataclass(frozen=True)
class Setup:
    """What the real run emulates; `placement[(stage, replica)]` is the node of each replica."""

    step_ms: float = 20.0  # emulated compute a step (set_step_time seconds)
    token_ms: float = 0.5  # ... plus this a token of the step (per_token)
    slow: tuple[int, int] = (1, 0)  # (stage, replica) whose inbound messages wait slow_ms
    slow_ms: float = 30.0  # the hop delay (set_hop_delay)
    load_knee: float = LOAD_KNEE  # the router's
    placement: tuple[tuple[int, int, str], ...] = ((0, 0, "gpu-a"), (0, 1, "gpu-b"), (1, 0, "gpu-a"), (1, 1, "gpu-b"))


@dataclass(frozen=True)
class Params:
    """The simulator's free parameters (ms)."""

    overhead_ms: float = 2.0  # added to every step
    hop_ms: float = 2.0  # every hop's latency


def replay_cluster(setup: Setup, params: Params) -> SimCluster:
    """The real run's cluster as a SimCluster (see the module docstring for the formulas)."""
    compute = setup.step_ms + setup.token_ms + params.overhead_ms
    names = ("head", *NODES)
    topo = Topology.from_dict({"nodes": {"head": {}, **{n: {"gpus": 2} for n in NODES}},
                               "links": [{"a": a, "b": b, "latency_ms": params.hop_ms, "bandwidth_gbps": 1e6}
                                         for a, b in itertools.combinations(names, 2)]}, where="calibration")
    model = ModelShape(name="tiny-llama (emulated)", layers=2, hidden=64, act_bytes=8, layer_ms=compute,
                       alpha=setup.token_ms / compute, max_batch=64)
    cluster = build_cluster(topo, [(s, node, 1.0) for s, _, node in setup.placement], ["head"], 2, model,
                            replica_ids=[r for _, r, _ in setup.placement], nvlink=(params.hop_ms, 1e6))
    inbound = [setup.slow_ms if (s, r) == setup.slow else 0.0 for s, r, _ in setup.placement]
    return dataclasses.replace(cluster, inbound_ms=np.array(inbound))


def replay(setup: Setup, mix: Mix, params: Params) -> dict[str, Any]:
    """The simulated run of `mix`: tokens/s, p50/p99 latency (s) and each replica's share of requests."""
    cluster = replay_cluster(setup, params)
    res = simulate(cluster, mix.workload(), "shortest", load_knee=setup.load_knee)
    labels = [f"stage-{s}/replica-{r}" for s, r in zip(cluster.stage.tolist(), cluster.replica.tolist())]
    routes = [[labels[i] for i in route] for route in res.routes]
    lat = res.latency_ms / 1000
    return summary(float(res.tokens.sum()), res.end_ms / 1000, lat.tolist(), routes)


def summary(tokens: float, seconds: float, latency_s: Sequence[float], routes: Sequence[Sequence[str]]) -> dict:
    """The JSON line fields both sides print; `routes` names the replicas (stage-k/replica-r) of each request."""
    share: dict[str, float] = {}
    for route in routes:
        for label in route:
            share[label] = share.get(label, 0.0) + 1 / len(routes)
    return {"requests": len(latency_s), "tokens": int(tokens), "tokens_per_s": round(tokens / seconds, 1),
            "latency_p50_s": round(float(np.percentile(latency_s, 50)), 3),
            "latency_p99_s": round(float(np.percentile(latency_s, 99)), 3),
            "share": {k: round(v, 3) for k, v in sorted(share.items())}}


def agreement(real: dict, sim: dict) -> dict[str, float]:
    """Relative errors of the simulator: (sim - real) / real for tokens/s, p50 and p99."""
    return {f"{k}_err": round((sim[k] - real[k]) / real[k], 3)
            for k in ("tokens_per_s", "latency_p50_s", "latency_p99_s")}


def fit(setup: Setup, mix: Mix, real: dict, overheads: Sequence[float] = OVERHEAD_GRID,
        hops: Sequence[float] = HOP_GRID) -> Params:
    """The grid point minimising max(|tokens/s error|, |p50 error|) of `replay` against `real`."""
    def loss(p: Params) -> float:
        err = agreement(real, replay(setup, mix, p))
        return max(abs(err["tokens_per_s_err"]), abs(err["latency_p50_s_err"]))

    return min((Params(o, h) for o in overheads for h in hops), key=loss)
