"""The router's test hooks (slow links, corrupted messages, emulated accelerator time) and its replica
controls for the autoscaler (loads, add, drain).

Mixins, so the router's own file stays about serving; every call acts through the replica pool.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from models import InvalidRequestError

if TYPE_CHECKING:
    from actors.pool import ReplicaPool
    from actors.replicas import Replica


class FaultHooks:
    """`set_hop_delay`, `inject_fault` and `set_step_time`, reached through the router's handle."""

    pool: ReplicaPool

    def _targets(self, stage: int, replica: int | None) -> list[Replica]:
        targets = [r for r in self.pool.table.by_stage[stage] if replica is None or r.replica == replica]
        if not targets:
            raise InvalidRequestError(f"stage {stage} has no replica {replica}")
        return targets

    async def set_hop_delay(self, stage: int, seconds: float, replica: int | None = None) -> None:
        """Delays every message into `stage` (one replica, or all) by `seconds`."""
        await asyncio.gather(*[r.handle.set_delay.remote(seconds) for r in self._targets(stage, replica)])

    async def inject_fault(self, stage: int, kind: str, count: int = 1, replica: int | None = None) -> None:
        """Corrupts or drops the next `count` messages that `stage` (one replica, or all) sends."""
        await asyncio.gather(*[r.handle.inject_fault.remote(kind, count) for r in self._targets(stage, replica)])

    async def set_step_time(self, stage: int, seconds: float, per_token: float = 0.0) -> None:
        """Every replica of `stage`, and any added later, takes `seconds` + `per_token` x tokens more per step."""
        self.pool.step_time[stage] = (seconds, per_token)
        await asyncio.gather(*[r.handle.set_step_time.remote(seconds, per_token) for r in self._targets(stage, None)])


class ScalingHooks:
    """Replicas added and removed at run time (the autoscaler calls these through the router's handle)."""

    pool: ReplicaPool

    async def stage_loads(self) -> list[dict[str, Any]]:
        """Per stage: live replicas, busy fraction since the last call, queue per replica, step ms."""
        return await self.pool.loads()

    async def add_replica(self, stage: int, timeout_s: float = 600.0) -> str:
        """Starts one more replica of `stage`; routes use it once it is ready. Returns its name. One not
        ready after `timeout_s` (no GPU came) is killed: DeploymentError."""
        return await self.pool.add(stage, timeout_s)

    async def drain_replica(self, stage: int, timeout_s: float = 60.0) -> str | None:
        """Removes the least-loaded replica of `stage` (never its last live one) once its sequences finish
        or move, then kills it. Returns its name, or None if the stage has a single live replica."""
        import ray

        rep = await self.pool.drain(stage, timeout_s)
        if rep is None:
            return None
        if self.rings:  # its rings end as a removal, not as a member's failure once it is killed
            await self.rings.break_over(stage, rep.replica)
        if self.prefix:  # an added replica may take its id: it caches none of this one's prefixes
            self.prefix.index.forget((stage, rep.replica))
        ray.kill(rep.handle, no_restart=True)
        return rep.name

    async def stage_stats(self) -> list[dict]:
        return await self.pool.stage_stats()
