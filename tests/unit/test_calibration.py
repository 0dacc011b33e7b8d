"""The replay half of `meshpipe bench calibrate` (topology/calibration.py): pure, no Ray."""

from __future__ import annotations

import pytest

from topology.calibration import MIXES, Params, Setup, agreement, fit, replay, replay_cluster, summary


def test_replay_cluster_follows_the_setup() -> None:
    setup, params = Setup(step_ms=20.0, token_ms=0.5, slow_ms=30.0), Params(overhead_ms=4.0, hop_ms=3.0)
    c = replay_cluster(setup, params)
    assert c.compute_ms.tolist() == [24.5] * 4  # step + a token + overhead
    assert c.model.alpha == pytest.approx(0.5 / 24.5)
    slow = [i for i in range(4) if (c.stage[i], c.replica[i]) == setup.slow]
    assert c.inbound_ms.tolist() == [30.0 if i in slow else 0.0 for i in range(4)]
    router, a = c.routers[0], int(c.host[0])
    assert c.transfer_ms(router, a, 0) == c.transfer_ms(a, a, 0) == 3.0  # every hop costs hop_ms


def test_replay_prints_the_bench_fields_and_avoids_the_slow_replica() -> None:
    setup = Setup()
    for mix in MIXES:
        got = replay(setup, mix, Params())
        assert got["requests"] == mix.requests and got["tokens"] == sum(w.gen_tokens for w in mix.workload())
        assert 0 < got["latency_p50_s"] <= got["latency_p99_s"] and got["tokens_per_s"] > 0
        share = got["share"]
        assert share["stage-0/replica-0"] + share["stage-0/replica-1"] == pytest.approx(1.0, abs=0.01)
        assert share["stage-1/replica-0"] < share["stage-1/replica-1"]  # its 30 ms inbound delay


def test_fit_recovers_the_parameters_of_a_replayed_run() -> None:
    setup, truth = Setup(), Params(overhead_ms=6.0, hop_ms=2.5)
    real = replay(setup, MIXES[0], truth)
    got = fit(setup, MIXES[0], real, overheads=(2.0, 6.0, 10.0), hops=(0.5, 2.5, 4.5))
    assert got == truth
    assert agreement(real, replay(setup, MIXES[0], got)) == {
        "tokens_per_s_err": 0.0, "latency_p50_s_err": 0.0, "latency_p99_s_err": 0.0}


def test_summary_shares_and_percentiles() -> None:
    got = summary(30.0, 3.0, [1.0, 2.0, 3.0], [["stage-0/replica-0"], ["stage-0/replica-0"], ["stage-0/replica-1"]])
    assert got["tokens_per_s"] == 10.0 and got["latency_p50_s"] == 2.0
    assert got["share"] == {"stage-0/replica-0": 0.667, "stage-0/replica-1": 0.333}
