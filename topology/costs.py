"""The one cost model of a replica: what the router, the planner and the simulator all evaluate.

Pure functions, no Ray. A route's cost (topology/planner.py) is its transfers plus the node cost of
every replica on it:

    node_cost   = inbound_ms + compute_ms + queue_ms
    compute_ms  = step_ms(...)   the predicted step time of the replica with one more sequence
    queue_ms    = queue_ms(...)  the wait behind the sequences it already serves

The inputs are moving averages of measurements (`ema`): the router feeds them from each step's
per-hop trace (actors/replicas.py), the simulator from the steps it simulates (topology/simulator.py).
"""

from __future__ import annotations

from typing import Protocol

EMA = 0.3  # weight of a new measurement in the moving averages
LOAD_KNEE = 8.0  # sequences on a replica at which its queue wait counts as one step time
MIN_STEP_MS = 1.0  # a queue wait is never priced below this step time (an unmeasured or tiny step)


class HasNodeCost(Protocol):
    """Anything with the three node-cost fields (topology.planner.ReplicaState)."""

    inbound_ms: float
    compute_ms: float
    queue_ms: float


def ema(old: float | None, new: float, weight: float = EMA) -> float:
    """Moving average: `new` if there is no `old`, else (1 - weight) * old + weight * new."""
    return new if old is None else (1 - weight) * old + weight * new


def step_ms(compute_ms: float | None, token_ms: float | None, sequences: int, fallback_ms: float = 1.0) -> float:
    """Predicted step time (ms) of a replica when one more sequence joins its `sequences`.

        base = compute_ms if measured, else fallback_ms (e.g. its stage's measured mean)
        step = max(base, token_ms * (sequences + 1))  once token_ms is measured, else base

    Compute-bound work grows with the batch (token_ms x sequences); a memory-bound step does not,
    and is predicted at its measured average. The max keeps a replica that just ran a long prefill
    (many tokens: a tiny token_ms) from looking nearly free (the simulator's "shortest" policy lost
    to random routing on p99 latency without it).
    """
    base = compute_ms if compute_ms is not None else fallback_ms
    return base if token_ms is None else max(base, token_ms * (sequences + 1))


def queue_ms(step: float, sequences: int, load_knee: float = LOAD_KNEE) -> float:
    """Expected wait (ms) behind a replica's load: max(step, MIN_STEP_MS) * sequences / load_knee."""
    return max(step, MIN_STEP_MS) * sequences / load_knee


def node_cost(state: HasNodeCost) -> float:
    """inbound_ms + compute_ms + queue_ms: what passing through one replica costs (ms)."""
    return state.inbound_ms + state.compute_ms + state.queue_ms
