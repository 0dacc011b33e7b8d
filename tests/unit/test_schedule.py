"""Training schedules as pure plans: order, completeness, peak activations, bubble fraction. No Ray."""

from __future__ import annotations

import pytest

from topology.schedule import Action, check, deal, lr_at, peak_in_flight, plan, simulate, theoretical_bubble


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("S", "M"), [(1, 1), (2, 4), (4, 4), (4, 8), (3, 2)])
def test_plans_are_complete_ordered_and_meet_the_theoretical_bubble(schedule: str, S: int, M: int) -> None:
    acts = plan(schedule, S, M)
    assert len(acts) == S
    check(acts, M)
    makespan, bubble = simulate(acts)
    assert makespan == pytest.approx(2 * (M + S - 1))
    assert bubble == pytest.approx(theoretical_bubble(S, M))


def test_1f1b_keeps_at_most_s_minus_stage_micro_batches_alive_and_gpipe_all() -> None:
    S, M = 4, 8
    assert [peak_in_flight(a) for a in plan("1f1b", S, M)] == [4, 3, 2, 1]
    assert [peak_in_flight(a) for a in plan("gpipe", S, M)] == [8, 8, 8, 8]
    assert [peak_in_flight(a) for a in plan("1f1b", 4, 2)] == [2, 2, 2, 1]  # never more than M


def test_the_1f1b_order_of_the_first_and_last_stages() -> None:
    first, last = plan("1f1b", 3, 4)[0], plan("1f1b", 3, 4)[-1]
    assert [repr(a) for a in first] == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert [repr(a) for a in last] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_bad_plans_and_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="B1 before F1"):
        check([[Action("F", 0), Action("B", 1), Action("F", 1), Action("B", 0)]], 2)
    with pytest.raises(ValueError, match="expected each"):
        check([[Action("F", 0), Action("B", 0)]], 2)
    with pytest.raises(ValueError, match="deadlocks"):  # stage 1 wants B0 from stage 2 before F0 reached it
        simulate([[Action("F", 0), Action("B", 0)], [Action("B", 0), Action("F", 0)], [Action("F", 0), Action("B", 0)]])
    with pytest.raises(ValueError, match="choose one of"):
        plan("zero-bubble", 2, 2)
    with pytest.raises(ValueError, match="at least 1"):
        plan("1f1b", 2, 0)


def test_a_slower_backward_grows_the_step_not_the_order() -> None:
    makespan, bubble = simulate(plan("1f1b", 2, 4), forward_s=1.0, backward_s=2.0)
    assert makespan == pytest.approx(3 * 4 + 3)  # M (F + B) on the last stage plus one F and one B of fill
    assert 0 < bubble < theoretical_bubble(2, 4) + 0.05


def test_deal_gives_faster_copies_proportionally_more_micro_batches() -> None:
    assert deal(8, [1.0, 1.0]) == [4, 4]
    assert deal(7, [1.0, 1.0]) == [4, 3]
    assert deal(8, [3.0, 1.0]) == [6, 2]
    assert deal(8, [100.0, 1.0]) == [7, 1]  # each copy keeps at least one
    assert deal(1, [1.0, 1.0]) == [1, 0]  # too few: the rest idle
    assert sum(deal(13, [0.3, 2.0, 1.1])) == 13
    with pytest.raises(ValueError, match="positive"):
        deal(4, [1.0, 0.0])
    with pytest.raises(ValueError, match="positive and finite"):  # was int(NaN): inf / inf
        deal(4, [1.0, float("inf")])
    with pytest.raises(ValueError, match="micro_batches=-3"):  # was dealt out as [-3]
        deal(-3, [1.0])
    assert deal(0, [1.0, 2.0]) == [0, 0]


def test_lr_schedules_warm_up_then_decay_to_the_floor() -> None:
    assert lr_at(1, 1.0) == 1.0
    assert [lr_at(s, 1.0, "constant", warmup=4) for s in (1, 2, 4, 5)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_at(10, 1.0, "linear", warmup=0, total=10, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(5, 1.0, "linear", total=10) == pytest.approx(0.5)
    assert lr_at(6, 1.0, "cosine", warmup=2, total=10) == pytest.approx(0.5)
    assert lr_at(50, 1.0, "cosine", total=10, min_lr=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="choose one of"):
        lr_at(1, 1.0, "step")
