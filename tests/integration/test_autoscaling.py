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
