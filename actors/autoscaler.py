"""The autoscaler actor: applies `topology.autoscaling.decide` to a deployment's stages.

Every `period_s` it reads the stages' load from the router, asks the pure policy, and acts:
an upscale asks Ray's cluster autoscaler ahead for the GPUs all stages will want
(`ray.autoscaler.sdk.request_resources`), then has the router start a replica (which asks Ray for
a GPU; with none free, the cluster autoscaler launches a node); a downscale has the router drain
a replica (no new sequences; its own finish or move; then it is killed), in the background: the
rounds go on meanwhile (an upscale need not wait up to a drain's minute), one drain a stage at a
time. Decisions are logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from actors.detach import background
from actors.metrics import AutoscalerMetrics
from topology.autoscaling import AutoscalingConfig, Decision, PolicyState, StageLoad, decide

log = logging.getLogger(__name__)

DECISIONS_KEPT = 256  # decisions `Pipeline.autoscaler_decisions` returns (each numbered: `n`)


class AutoscalerActor:
    def __init__(self, deployment: str, router: Any, config: dict, gpus_per_replica: float) -> None:
        self.deployment = deployment
        self.router = router
        self.cfg = AutoscalingConfig(**config)
        self.gpus_per_replica = gpus_per_replica
        self.state = PolicyState()
        self.metrics = AutoscalerMetrics(deployment)
        # the last DECISIONS_KEPT decisions applied: n (1, 2, ... in all), time, stage, delta, reason, seconds
        self.history: deque[dict[str, Any]] = deque(maxlen=DECISIONS_KEPT)
        self.applied = 0
        self._task: asyncio.Task | None = None
        self.draining: dict[int, asyncio.Task] = {}  # stage -> its drain under way (one a stage at a time)
        import ray

        ctx = ray.get_runtime_context()
        if ctx.was_current_actor_reconstructed:  # Ray restarted it: nobody else calls `start` again
            ctx.current_actor.start.remote()

    async def start(self) -> None:
        if self._task is None:
            self._task = background(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self.draining.values()):
            task.cancel()

    def decisions(self) -> list[dict[str, Any]]:
        return list(self.history)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.period_s)
            try:
                loads = [StageLoad(**x) for x in await self.router.stage_loads.remote()]
                total = sum(ld.replicas for ld in loads)  # follows each decision applied this round
                for d in decide(loads, self.cfg, self.state, time.monotonic()):
                    if d.delta > 0:
                        total = await self._apply(d, total)
                    elif d.stage not in self.draining:  # a drain waits for its replica's sequences (up to
                        self.draining[d.stage] = background(self._drain(d, total))  # a minute): rounds go on
                        total -= 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed round must not end the loop
                log.warning("autoscaler of %r: round failed (%s: %s)", self.deployment, type(e).__name__, e)

    async def _drain(self, d: Decision, total: int) -> None:
        try:
            await self._apply(d, total)
        except Exception as e:  # noqa: BLE001 - the replica stays; a later round may decide again
            log.warning("autoscaler of %r: removing a replica of stage %d failed (%s: %s)", self.deployment,
                        d.stage, type(e).__name__, e)
        finally:
            self.draining.pop(d.stage, None)

    async def _apply(self, d: Decision, total: int) -> int:
        """Acts on one decision; returns the deployment's replica count after it (`total` before)."""
        t0 = time.monotonic()
        log.warning("autoscaler of %r: %s a replica of stage %d (%s)", self.deployment,
                    "adding" if d.delta > 0 else "removing", d.stage, d.reason)
        if d.delta > 0:
            request_gpus(total + 1, self.gpus_per_replica)  # ask Ray's cluster autoscaler ahead
            try:
                name = await self.router.add_replica.remote(d.stage, self.cfg.add_timeout_s)
            except Exception:
                request_gpus(total, self.gpus_per_replica)  # no replica came: no standing ask for it
                raise
        else:
            name = await self.router.drain_replica.remote(d.stage)
            if name is None:  # no other replica of the stage was live by the end: it kept serving
                log.warning("autoscaler of %r: stage %d kept its replica", self.deployment, d.stage)
                return total
            request_gpus(total - 1, self.gpus_per_replica)  # a lower floor lets idle nodes go
        self.metrics.decided(d.stage, d.delta)
        self.applied += 1
        self.history.append({"n": self.applied, "at": time.time(), "stage": d.stage, "delta": d.delta,
                             "reason": d.reason, "replica": name, "seconds": round(time.monotonic() - t0, 3)})
        return total + d.delta


def request_gpus(replicas: int, gpus_per_replica: float) -> None:
    """Sets the deployment's standing ask to Ray's cluster autoscaler: one GPU bundle per replica.

    `request_resources` is a floor the autoscaler keeps (nodes are launched for it, and not taken
    away below it), so it follows the replica count both ways. No-op without GPUs or an autoscaler.
    """
    if not gpus_per_replica or replicas < 0:
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[{"GPU": gpus_per_replica}] * replicas)
    except Exception as e:  # noqa: BLE001 - a cluster without an autoscaler: Ray places what it can
        log.info("request_resources: %s", e)
