"""The autoscaling policy (pure): delays, the bottleneck first, bounds, hysteresis, no flapping."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from topology.autoscaling import AutoscalingConfig, PolicyState, StageLoad, decide, desired_replicas

CFG = AutoscalingConfig(min_replicas=1, max_replicas=3, target_busy=0.7, upscale_delay_s=2.0,
                        downscale_delay_s=10.0, downscale_below=0.6)


def run(load_at, replicas: list[int], seconds: float, cfg: AutoscalingConfig = CFG, dt: float = 0.5,
        capacity: bool = True) -> tuple[list[tuple[float, int, int]], list[int]]:
    """Drives the policy with `load_at(t, stage)` = total work in replica-units; busy = work / replicas."""
    state, events, reps = PolicyState(), [], list(replicas)
    t = 0.0
    while t <= seconds:
        loads = [StageLoad(k, reps[k], busy=min(1.0, load_at(t, k) / reps[k]) if capacity else load_at(t, k))
                 for k in range(len(reps))]
        for d in decide(loads, cfg, state, t):
            reps[d.stage] += d.delta
            events.append((t, d.stage, d.delta))
        t += dt
    return events, reps


def test_a_load_step_scales_the_bottleneck_up_after_the_delay_and_only_it() -> None:
    events, reps = run(lambda t, k: (1.3 if k == 1 else 0.3) if t >= 5 else 0.3, [1, 1, 1], 20)
    ups = [(t, k) for t, k, d in events if d > 0]
    assert ups and ups[0] == (7.0, 1)  # the step at 5 s, the delay 2 s
    assert reps == [1, 2, 1]  # 1.3 over 2 replicas = 0.65 < 0.7: enough
    assert all(k == 1 for _, k in ups)


def test_the_worst_stage_goes_first_one_replica_per_decision() -> None:
    events, reps = run(lambda t, k: [0.9, 2.0, 0.2][k], [1, 1, 1], 1.9 + 0.5 * 3)
    assert events[0][1:] == (1, 1)  # stage 1 is the bottleneck
    assert len([e for e in events if e[0] == events[0][0]]) == 1


def test_load_going_down_scales_down_after_the_delay_and_never_below_min() -> None:
    events, reps = run(lambda t, k: 1.8 if t < 10 else 0.2, [3, 3], 60)
    downs = [(t, k) for t, k, d in events if d < 0]
    assert downs and min(t for t, _ in downs) >= 20.0  # 10 s after the load fell
    assert reps == [1, 1]  # min_replicas


def test_never_above_max_replicas() -> None:
    _, reps = run(lambda t, k: 10.0, [1], 60)
    assert reps == [3]


def test_oscillating_load_does_not_flap() -> None:
    # work flips between overload (2.0 on 2 replicas) and idle (0.2) every 1.5 s: shorter than either delay
    events, reps = run(lambda t, k: 2.0 if int(t // 1.5) % 2 == 0 else 0.2, [2], 120)
    assert events == [] and reps == [2]


def test_load_in_the_band_between_the_thresholds_holds_still() -> None:
    # 2 replicas at 0.55 busy: under target, but with one fewer it would be 1.1 -> keep both
    events, reps = run(lambda t, k: 1.1, [2], 120)
    assert events == [] and reps == [2]


def test_a_sustained_step_up_then_down_gives_one_rise_and_one_fall_per_replica() -> None:
    events, reps = run(lambda t, k: 2.5 if 10 <= t < 60 else 0.2, [1], 120)
    deltas = [d for _, _, d in events]
    assert deltas == [1, 1, -1, -1] and reps == [1]


def test_queue_counts_as_overload_even_when_busy_reads_low() -> None:
    state = PolicyState()
    loads = [StageLoad(0, 1, busy=0.2, queue=5.0)]
    assert decide(loads, CFG, state, 0.0) == []
    assert [d.delta for d in decide(loads, CFG, state, 2.0)] == [1]


def test_below_min_replicas_is_restored_at_once() -> None:
    cfg = AutoscalingConfig(min_replicas=2, max_replicas=4)
    d = decide([StageLoad(0, 1, busy=0.0)], cfg, PolicyState(), 0.0)
    assert [(x.stage, x.delta) for x in d] == [(0, 1)]


def test_desired_replicas_meets_the_target_within_bounds() -> None:
    assert desired_replicas(StageLoad(0, 2, busy=1.0), CFG) == 3
    assert desired_replicas(StageLoad(0, 2, busy=0.35), CFG) == 1
    assert desired_replicas(StageLoad(0, 3, busy=0.7), CFG) == 3
    assert math.isclose(CFG.target_busy, 0.7)


def test_bad_config_is_rejected_naming_the_fields() -> None:
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingConfig(min_replicas=4, max_replicas=2)
    with pytest.raises(ValidationError, match="target_busy"):
        AutoscalingConfig(target_busy=1.5)
    with pytest.raises(ValidationError, match="target_busy"):  # busy never exceeds 1: it would never scale up
        AutoscalingConfig(target_busy=1.0)
    with pytest.raises(ValidationError, match="nope"):
        AutoscalingConfig(nope=1)


def test_removals_come_before_the_addition_of_a_round() -> None:
    cfg = AutoscalingConfig(upscale_delay_s=0, downscale_delay_s=0)
    d = decide([StageLoad(0, 1, busy=1.0), StageLoad(1, 3, busy=0.05)], cfg, PolicyState(), 0.0)
    assert [(x.stage, x.delta) for x in d] == [(1, -1), (0, 1)]  # the GPU it frees may be the one the add needs


@pytest.mark.parametrize(("busy", "queue"), [(math.nan, 50.0), (0.0, math.nan), (math.inf, 0.0)])
def test_figures_that_are_not_finite_leave_the_stage_as_it_is(busy: float, queue: float) -> None:
    cfg = AutoscalingConfig(upscale_delay_s=0, downscale_delay_s=0, min_replicas=2)
    state = PolicyState()
    for t in range(3):
        assert decide([StageLoad(0, 3, busy, queue)], cfg, state, float(t)) == []  # neither way
    assert [(x.stage, x.delta) for x in decide([StageLoad(0, 1, busy, queue)], cfg, state, 5.0)] == [(0, 1)]  # min

