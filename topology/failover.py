"""What to do when replicas on a route stop answering: a pure policy, unit-tested without Ray.

The router probes the route's replicas after a failed step and calls `failover` with what it
found; it acts on the returned decision (ban and move, wait for a restart, or fail the step).
Only the failed stages change replica: surviving stages keep their caches, so nothing is
appended twice and the rebuild touches only the stages that lost state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from topology.planner import HostCosts, NoReplicaError, ReplicaState, Route, plan


class Health(str, Enum):
    UP = "up"  # answers
    DOWN = "down"  # does not answer now (restarting, or its node is unreachable)
    GONE = "gone"  # dead for good: Ray will not restart it (restarts used up, or killed for good)


@dataclass
class Failover:
    """The decision: the route to use now, and what the router must do before using it."""

    route: Route  # the route to use (the old one when nothing moves)
    moved: list[int] = field(default_factory=list)  # stages whose replica changed (caches rebuilt there)
    wait: list[int] = field(default_factory=list)  # stages whose replica is down with no alternative: wait
    gone: list[int] = field(default_factory=list)  # stages with no replica left at all: fail the step

    @property
    def ok(self) -> bool:
        return not self.gone


def failover(route: Route, health: Sequence[Health], replicas: Sequence[ReplicaState], num_stages: int,
             costs: HostCosts, source: str, prefer: Mapping[int, int] | None = None) -> Failover:
    """Replaces each failed stage's replica on `route` by the cheapest live one (or `prefer[stage]`).

    `health[k]` is the route's stage-k replica's health; `replicas` are all replicas with `alive`
    as the router knows it (banned ones are not alive). A down stage with no live alternative is
    waited for; a gone one with no alternative fails. `prefer` names a stage's standby replica (one
    that holds copies of the sequences' caches): it wins over the cheapest when alive.
    """
    prefer = prefer or {}
    failed = [k for k in range(num_stages) if health[k] != Health.UP]
    if not failed:
        return Failover(route)
    alive = {(r.stage, r.replica) for r in replicas if r.alive}
    movable, wait, gone = [], [], []
    for k in failed:
        others = [r for r in replicas if r.stage == k and r.replica != route.replicas[k] and r.alive]
        if others:
            movable.append(k)
        elif health[k] == Health.DOWN:
            wait.append(k)
        else:
            gone.append(k)
    if gone or not movable:
        return Failover(route, wait=wait, gone=gone)
    fixed = {k: route.replicas[k] for k in range(num_stages) if k not in movable}
    fixed |= {k: prefer[k] for k in movable if (k, prefer.get(k)) in alive and prefer[k] != route.replicas[k]}

    def allowed(r: ReplicaState) -> bool:
        if r.stage in fixed:
            return r.replica == fixed[r.stage]  # a stage that keeps (or is given) its replica; alive or not
        return r.alive and r.replica != route.replicas[r.stage]

    states = [replace(r, alive=allowed(r)) for r in replicas]
    try:
        new = plan(states, num_stages, costs, source)
    except NoReplicaError:  # e.g. no finite-cost link to the alternatives: wait for the old replicas instead,
        # but only where they can come back: a gone one never does, and the router's wait returns at once
        # for it, so "wait" on a gone stage would re-run the same decision in a loop that never ends
        return Failover(route, wait=[k for k in failed if health[k] != Health.GONE],
                        gone=[k for k in failed if health[k] == Health.GONE])
    return Failover(new, moved=[k for k in movable if new.replicas[k] != route.replicas[k]], wait=wait)


def choose_node(free: Mapping[str, Mapping[str, float]], need: Mapping[str, float], exclude: set[str],
                near: Sequence[str] = ()) -> str | None:
    """Where to place a replica anew: an alive node (not in `exclude`) with `need` free.

    `free` is each alive node's free resources. Prefers nodes hosting the route's other stages
    (`near`: cheaper links), then the one with the most free GPUs, then the node id (deterministic).
    None if no node fits: the caller fails the step with a typed error (or waits for the autoscaler).
    """
    fits = [n for n, res in free.items() if n not in exclude and all(res.get(k, 0.0) >= v for k, v in need.items())]
    if not fits:
        return None
    return min(fits, key=lambda n: (n not in near, -free[n].get("GPU", 0.0), n))
