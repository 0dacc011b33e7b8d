"""The failover policy (pure): only failed stages move; down-without-alternative waits; gone fails."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from topology.failover import Health, failover
from topology.planner import HostCosts, ReplicaState, plan

UP, DOWN, GONE = Health.UP, Health.DOWN, Health.GONE


def states(counts: list[int], dead: set[tuple[int, int]] = frozenset(), compute: dict | None = None,
           hosts: dict | None = None) -> list[ReplicaState]:
    compute, hosts = compute or {}, hosts or {}
    return [ReplicaState(stage=s, replica=r, host=hosts.get((s, r), "n0"), compute_ms=compute.get((s, r), 1.0),
                         alive=(s, r) not in dead)
            for s, c in enumerate(counts) for r in range(c)]


COSTS = HostCosts.uniform(["n0", "n1"], 5.0)


def test_nothing_failed_keeps_the_route() -> None:
    reps = states([2, 2])
    route = plan(reps, 2, COSTS, "n0")
    d = failover(route, [UP, UP], reps, 2, COSTS, "n0")
    assert d.route == route and not d.moved and not d.wait and d.ok


def test_only_the_failed_stage_moves_even_when_other_stages_have_cheaper_replicas() -> None:
    reps = states([2, 2, 2], compute={(0, 1): 0.1, (2, 1): 0.1})  # replica 1 of stages 0 and 2 got cheaper
    route = plan(states([2, 2, 2]), 3, COSTS, "n0")  # chosen before: all replica 0
    assert route.replicas == (0, 0, 0)
    d = failover(route, [UP, DOWN, UP], reps, 3, COSTS, "n0")
    assert d.route.replicas == (0, 1, 0) and d.moved == [1] and not d.wait


def test_the_cheapest_alternative_wins_unless_a_standby_is_preferred() -> None:
    reps = states([1, 3], compute={(1, 1): 9.0, (1, 2): 2.0})
    route = plan(states([1, 1]), 2, COSTS, "n0")
    assert failover(route, [UP, GONE], reps, 2, COSTS, "n0").route.replicas == (0, 2)
    assert failover(route, [UP, GONE], reps, 2, COSTS, "n0", prefer={1: 1}).route.replicas == (0, 1)
    banned = states([1, 3], dead={(1, 1)}, compute={(1, 2): 2.0})
    assert failover(route, [UP, GONE], banned, 2, COSTS, "n0", prefer={1: 1}).route.replicas == (0, 2)


def test_a_down_stage_without_alternative_is_waited_for_and_a_gone_one_fails() -> None:
    reps = states([1, 1])
    route = plan(reps, 2, COSTS, "n0")
    d = failover(route, [UP, DOWN], reps, 2, COSTS, "n0")
    assert d.route == route and d.wait == [1] and d.ok
    d = failover(route, [GONE, UP], reps, 2, COSTS, "n0")
    assert d.gone == [0] and not d.ok


def test_alternatives_already_banned_do_not_count() -> None:
    reps = states([2, 2], dead={(1, 1)})
    route = plan(states([2, 2]), 2, COSTS, "n0")
    assert route.replicas[1] == 0
    assert failover(route, [UP, GONE], reps, 2, COSTS, "n0").gone == [1]


def test_two_failed_stages_move_together_and_a_waited_one_stays() -> None:
    reps = states([2, 1, 2])
    route = plan(reps, 3, COSTS, "n0")
    d = failover(route, [DOWN, DOWN, GONE], reps, 3, COSTS, "n0")
    assert d.moved == [0, 2] and d.wait == [1] and d.ok
    assert d.route.replicas == (1 - route.replicas[0], route.replicas[1], 1 - route.replicas[2])



def test_a_gone_stage_whose_alternatives_are_unreachable_fails_instead_of_waiting() -> None:
    # replica 1 of stage 1 lives but no finite-cost link reaches it: the plan fails. A gone replica
    # never comes back, and the router's wait returns at once for it: "wait" made it loop for ever
    costs = HostCosts(["n0", "n1"], np.array([[0.0, math.inf], [math.inf, 0.0]]))
    reps = [ReplicaState(0, 0, "n0"), ReplicaState(1, 0, "n0"), ReplicaState(1, 1, "n1")]
    route = plan(reps, 2, costs, "n0")
    d = failover(route, [UP, GONE], reps, 2, costs, "n0")
    assert d.gone == [1] and not d.wait and not d.ok and d.route == route
    d = failover(route, [DOWN, GONE], reps, 2, costs, "n0")  # a down stage is still waited for
    assert d.gone == [1] and d.wait == [0] and not d.ok
    d = failover(route, [UP, DOWN], reps, 2, costs, "n0")  # a down one may restart: wait, as before
    assert d.wait == [1] and not d.gone and d.ok


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_never_keep_a_failed_replica_when_an_alternative_lives(seed: int) -> None:
    import random

    rng = random.Random(seed)
    counts = [rng.randint(1, 3) for _ in range(rng.randint(1, 4))]
    hosts = {(s, r): rng.choice(["n0", "n1"]) for s, c in enumerate(counts) for r in range(c)}
    compute = {k: rng.uniform(0.5, 5) for k in hosts}
    fresh = states(counts, hosts=hosts, compute=compute)
    route = plan(fresh, len(counts), COSTS, "n0")
    health = [rng.choice([UP, UP, DOWN, GONE]) for _ in counts]
    dead = {(s, route.replicas[s]) for s, h in enumerate(health) if h != UP}
    dead |= {k for k in hosts if rng.random() < 0.2 and k[1] != route.replicas[k[0]]}
    reps = states(counts, dead=dead, hosts=hosts, compute=compute)
    d = failover(route, health, reps, len(counts), COSTS, "n0")
    lost = [s for s, h in enumerate(health) if h == GONE
            and all(r == route.replicas[s] or (s, r) in dead for r in range(counts[s]))]
    assert d.gone == lost
    if lost:  # the step fails: nothing else matters
        return
    for s, h in enumerate(health):
        alternatives = [r for r in range(counts[s]) if r != route.replicas[s] and (s, r) not in dead]
        if h == UP:
            assert d.route.replicas[s] == route.replicas[s]  # survivors keep their caches
        elif alternatives:
            assert s in d.moved and d.route.replicas[s] in alternatives
        elif h == DOWN:
            assert s in d.wait and d.route.replicas[s] == route.replicas[s]
    if d.ok and not d.wait:  # the new route is the cheapest among routes that keep the survivors
        options = [[route.replicas[s]] if h == UP else
                   [r for r in range(counts[s]) if r != route.replicas[s] and (s, r) not in dead]
                   for s, h in enumerate(health)]
        costs_of = []
        for combo in itertools.product(*options):
            pinned = [ReplicaState(**{**vars(x), "alive": x.replica == combo[x.stage]}) for x in reps]
            costs_of.append(plan(pinned, len(counts), COSTS, "n0").cost_ms)
        assert d.route.cost_ms == pytest.approx(min(costs_of))


def test_choose_node_needs_free_resources_skips_the_dead_and_prefers_neighbours() -> None:
    from topology.failover import choose_node

    free = {"a": {"GPU": 0.0}, "b": {"GPU": 1.0}, "c": {"GPU": 2.0}, "d": {"GPU": 1.0}}
    assert choose_node(free, {"GPU": 1}, exclude=set()) == "c"  # most free GPUs
    assert choose_node(free, {"GPU": 1}, exclude={"c"}) == "b"  # ties by id
    assert choose_node(free, {"GPU": 1}, exclude=set(), near=["d"]) == "d"  # next to the route's stages
    assert choose_node(free, {"GPU": 3}, exclude=set()) is None
    assert choose_node(free, {}, exclude={"a", "b", "c", "d"}) is None
