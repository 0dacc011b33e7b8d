"""Ray's own record of an actor, read from the GCS: its state and how often it was restarted.

Ray has no public API for one actor's state without the dashboard's state API (which the tests
and many notebooks run without), so this reads the GCS table `ray.util.state` is built on. It
takes ~0.4 ms an actor (`actor_records` reads many at once); Ray marks a killed actor RESTARTING
within milliseconds, long before a call to it fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def actor_record(actor: Any) -> tuple[str, int]:
    """(ALIVE | RESTARTING | DEAD | PENDING_CREATION | ..., restarts so far) of an actor handle or id hex.

    ("UNKNOWN", 0) when the record cannot be read: callers must not treat that as dead.
    """
    from ray._private import state

    actor_id = actor if isinstance(actor, str) else actor._actor_id.hex()
    try:
        info = state.actors(actor_id=actor_id)
        return info["State"], int(info.get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 - an internal table: a failure must not stop the caller
        return "UNKNOWN", 0


def actor_records(actors: Sequence[Any]) -> list[tuple[str, int]]:
    """`actor_record` of each actor handle or id hex, from one read of the calling job's live actors: ~0.5 ms
    for a deployment of any size, where a read each costs ~0.4 ms per actor (measured: README). An actor not
    alive there (restarting, dead, or another job's) is read on its own, so the answers are the same."""
    import ray
    from ray._private import state

    ids = [a if isinstance(a, str) else a._actor_id.hex() for a in actors]
    try:
        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        alive = state.actors(job_id=job, actor_state_name="ALIVE")
    except Exception:  # noqa: BLE001 - an internal table: each actor is read on its own instead
        alive = {}
    out = []
    for actor_id in ids:
        info = alive.get(actor_id)
        out.append(("ALIVE", int(info.get("NumRestarts", 0))) if info else actor_record(actor_id))
    return out


def own_restarts() -> int | None:
    """How often Ray has restarted the calling actor (0 on its first start); None when the GCS could not
    say (callers fail closed: a router then keeps its journal, as after a restart)."""
    import ray

    state, restarts = actor_record(ray.get_runtime_context().get_actor_id())
    return None if state == "UNKNOWN" else restarts
