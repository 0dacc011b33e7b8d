"""`meshpipe bench calibrate`: a real run on a 3-node Ray cluster, then its replay in the simulator.

Real side: `ray.cluster_utils.Cluster` on this machine (a head for the router, two worker nodes
`gpu-a`, `gpu-b` with 2 fake GPUs each, as tests/integration/multinode.py), a tiny random Llama
(tests/checkpoints.py) deployed as 2 stages x 2 replicas, emulated compute (`set_step_time`) and a slow
link into one replica (`set_hop_delay`); each request mix (topology/calibration.py `MIXES`) is
submitted on its seeded arrival schedule and timed from the client. Simulator side: the same setup and
mixes replayed (topology/calibration.py); its free parameters are fitted on the first mix only.

One JSON line per (side, mix): tokens/s, p50/p99 request latency, share of requests per replica;
simulator lines add the fitted parameters and the relative errors against the real run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from topology.calibration import MIXES, Mix, Params, Setup, agreement, fit, replay, summary

log = logging.getLogger(__name__)

TARGET = 0.2  # tokens/s and p50 within 20 % of the real run


def _label(name: str) -> str:
    """meshpipe/<deployment>/stage-k/replica-r -> stage-k/replica-r."""
    return "/".join(name.split("/")[-2:])


def run_mix(pipe: Any, mix: Mix) -> dict[str, Any]:
    """Submit `mix` on its arrival schedule (one thread a request); the real run's summary."""
    work = mix.workload()
    rng = np.random.default_rng([mix.seed, 3])
    prompts = [rng.integers(3, 250, w.prompt_len).tolist() for w in work]
    t0 = time.monotonic()

    def one(i: int) -> tuple[float, float, int, list[str]]:
        time.sleep(max(0.0, t0 + work[i].arrival_s - time.monotonic()))
        sent = time.monotonic()
        rid = pipe.submit(prompts[i], max_new_tokens=work[i].gen_tokens, ignore_eos=True)
        out = pipe.result(rid, timeout=120)
        return sent, time.monotonic(), len(out.token_ids), [_label(n) for n in out.route]

    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        got = list(pool.map(one, range(len(work))))
    end = max(done for _, done, _, _ in got)
    return summary(sum(n for *_, n, _ in got), end - t0, [done - sent for sent, done, _, _ in got],
                   [route for *_, route in got])


def real_runs(setup: Setup, mixes: Sequence[Mix]) -> tuple[Setup, list[dict[str, Any]]]:
    """Deploy on a 3-node cluster, run every mix; the setup with the replicas' real nodes, and the summaries."""
    import ray
    from ray.cluster_utils import Cluster

    from actors import Pipeline
    from models.random_checkpoint import save_random_llama

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    try:
        workers = {cluster.add_node(num_cpus=1, num_gpus=2, resources={n: 1}).node_id: n for n in ("gpu-a", "gpu-b")}
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = save_random_llama(Path(tmp) / "tiny", n_layers=4, init=0.5, max_seq_len=256)
            pipe = Pipeline.deploy(ckpt, num_stages=2, replicas_per_stage=2, dtype="float32", name="calibrate",
                                   micro_batches=1)
        try:
            placement = tuple((s["stage"], s["replica"], workers[s["node_id"]]) for s in pipe.describe()["stages"])
            setup = Setup(**{**vars(setup), "placement": placement})
            for stage in (0, 1):
                pipe.set_step_time(stage, setup.step_ms / 1000, per_token=setup.token_ms / 1000)
            pipe.set_hop_delay(setup.slow[0], setup.slow_ms / 1000, replica=setup.slow[1])
            pipe.generate([[5, 6, 7]] * 4, max_new_tokens=8, ignore_eos=True)  # warm-up: the router measures
            rows = []
            for mix in mixes:
                rows.append(run_mix(pipe, mix))
                log.info("real %s: %s", mix.name, rows[-1])
            return setup, rows
        finally:
            pipe.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def bench_calibrate(setup: Setup = Setup(), mixes: Sequence[Mix] = MIXES) -> Iterator[dict[str, Any]]:
    """Real and simulated lines per mix; the simulator is fitted on `mixes[0]` and checked on the rest."""
    t = time.monotonic()
    setup, reals = real_runs(setup, mixes)
    head = {"bench": "calibrate", "step_ms": setup.step_ms, "token_ms": setup.token_ms,
            "slow": f"stage-{setup.slow[0]}/replica-{setup.slow[1]}", "slow_ms": setup.slow_ms,
            "placement": {f"stage-{s}/replica-{r}": node for s, r, node in setup.placement}}
    params: Params = fit(setup, mixes[0], reals[0])
    for i, (mix, real) in enumerate(zip(mixes, reals)):
        sim = replay(setup, mix, params)
        err = agreement(real, sim)
        yield {**head, "side": "real", "mix": mix.name, **real}
        yield {**head, "side": "simulator", "mix": mix.name, "fitted_on_this_mix": i == 0, **vars(params), **sim,
               **err, "within_target": abs(err["tokens_per_s_err"]) <= TARGET
               and abs(err["latency_p50_s_err"]) <= TARGET}
    log.info("calibrate: %.1f s", time.monotonic() - t)
