"""The autoscaler on the session Ray (logical GPUs): a load step adds replicas to the bottleneck stage,
throughput rises, the replicas drain away after the load; nothing lost, tokens identical.

Stage 1 sleeps 6 ms per token of each step (`set_step_time`, emulated compute-bound accelerator
time), so an added replica raises throughput even though the actors share this machine's CPUs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from actors import Pipeline
from tests.support import load_step, token_rate

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(3 + i % 5)] for i in range(96)]  # load outlasts the scale-up
NEW = 30


def test_a_load_step_adds_bottleneck_replicas_and_they_drain_after(tiny_ckpt: Path) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="autoscale", micro_batches=1,
                           # max 2: a second new replica's start (import torch: a core for seconds) would
                           # fall into the window that measures the first one's gain
                           autoscaling={"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0,
                                        "downscale_delay_s": 3.0, "period_s": 0.25})
    try:
        reference = [pipe.generate(p, max_new_tokens=NEW, ignore_eos=True)[0].token_ids for p in PROMPTS[:4]]
        pipe.set_step_time(1, 0.0, per_token=0.006)  # stage 1 is the bottleneck, compute-bound
        outs, samples, _ = load_step(pipe, PROMPTS, NEW)  # 8 requests in flight at all times
        assert len(outs) == len(PROMPTS)  # nothing lost
        assert [outs[i] for i in range(4)] == reference  # identical to the unloaded run
        ups = [d for d in pipe.autoscaler_decisions() if d["delta"] > 0]
        assert ups and all(d["stage"] == 1 for d in ups), ups
        serving = ups[0]["at"]  # the first new replica is ready (add_replica returned)

        before = token_rate(samples, samples[0][0], serving - ups[0]["seconds"])
        # sequences keep the replica that holds their cache: only those started after `serving` use the new
        # one, so the gain is measured once the sequences in flight then (NEW tokens each) have turned over
        after = token_rate(samples, serving + 2.5, serving + 5.5)
        assert after > 1.3 * before, (before, after)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and [len(s) for s in pipe.stats()["router"]["replicas"]] != [1, 1]:
            time.sleep(0.5)
        assert [len(s) for s in pipe.stats()["router"]["replicas"]] == [1, 1]  # drained back to min
        decisions = pipe.autoscaler_decisions()
        assert [d["n"] for d in decisions] == list(range(1, len(decisions) + 1)), decisions  # numbered in all
        deltas = [d["delta"] for d in decisions]
        assert deltas.count(-1) == deltas.count(+1), deltas  # every replica added went again
        assert pipe.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)[0].token_ids == reference[0]
    finally:
        pipe.shutdown()


def test_a_restarted_autoscaler_keeps_scaling_and_a_restarting_replica_is_no_reason_to_add_one(
        tiny_ckpt: Path) -> None:
    """Ray restarts the autoscaler actor (max_restarts=-1): it starts its loop again by itself (before, it sat
    idle and the stage stayed below min_replicas). A replica that Ray is restarting still counts toward
    min_replicas (before, a kill added a third replica that stayed until the downscale delay)."""
    import threading

    import ray

    from actors.naming import NAMESPACE, autoscaler_name
    from tests.support import wait_for

    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="autoscale-restart", micro_batches=1,
                           autoscaling={"min_replicas": 2, "max_replicas": 3, "upscale_delay_s": 30.0,
                                        "downscale_delay_s": 600.0, "period_s": 0.25})
    counts = lambda: [len(s) for s in pipe.stats()["router"]["replicas"]]  # noqa: E731
    try:
        wait_for(lambda: counts() == [2, 2], 60, "both stages at min_replicas")
        pipe.set_hop_delay(0, 0.05)
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault("out", pipe.generate(PROMPTS[:6], max_new_tokens=40,
                                                                                  ignore_eos=True)))
        t.start()
        wait_for(lambda: pipe.stats()["router"]["tokens_generated"] >= 30, 60, "tokens flowing")
        reps = pipe.stats()["router"]["replicas"][1]
        busy = next(i for i, r in enumerate(reps) if r["sequences"])
        ray.kill(ray.get_actor(f"meshpipe/autoscale-restart/stage-1/replica-{busy}", namespace=NAMESPACE),
                 no_restart=False)
        t.join(120)
        assert len(done["out"]) == 6
        time.sleep(2)
        assert not [d for d in pipe.autoscaler_decisions() if d["delta"] > 0] and counts() == [2, 2]
        scaler = ray.get_actor(autoscaler_name("autoscale-restart"), namespace=NAMESPACE)
        ray.kill(scaler, no_restart=False)
        wait_for(lambda: _answers(scaler), 60, "the autoscaler restarted")
        ray.get(pipe.router.drain_replica.remote(1, 5.0), timeout=60)  # below min: it must add one back
        wait_for(lambda: counts() == [2, 2], 60, "stage 1 back at min_replicas after the autoscaler's restart")
    finally:
        pipe.shutdown()


def _answers(handle: object) -> bool:
    import ray

    try:
        ray.get(handle.decisions.remote(), timeout=5)  # type: ignore[attr-defined]
        return True
    except Exception:  # noqa: BLE001 - still restarting
        return False
