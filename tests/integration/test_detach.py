"""A call made `detached` from a task survives that task's recursive cancel (Ray Serve's, when a client leaves).

The control shows the test can fail: the same call made plainly is cancelled with its parent.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.detach import detached
from tests.support import wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")


@ray.remote(num_cpus=0)
class Probe:
    """Counts calls of `slow` begun, run to their end, and cancelled."""

    def __init__(self) -> None:
        self.begun = self.ended = self.cancelled = 0

    async def slow(self) -> None:
        self.begun += 1
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.ended += 1

    def counts(self) -> tuple[int, int, int]:
        return self.begun, self.ended, self.cancelled


@ray.remote(num_cpus=0)
class Caller:
    async def call_then_wait(self, probe: ray.actor.ActorHandle, detach: bool) -> None:
        if detach:
            detached(probe.slow.remote)
        else:
            probe.slow.remote()
        await asyncio.sleep(60)  # cancelled long before


@pytest.mark.parametrize("detach", [False, True])
def test_a_detached_call_outlives_its_callers_recursive_cancel(detach: bool) -> None:
    probe, caller = Probe.remote(), Caller.remote()
    ref = caller.call_then_wait.remote(probe, detach)
    wait_for(lambda: ray.get(probe.counts.remote())[0] == 1, 30, "the probe's call to begin")
    ray.cancel(ref)  # recursive, as Ray Serve cancels a request whose client left
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    wait_for(lambda: sum(ray.get(probe.counts.remote())[1:]) == 1, 30, "the probe's call to end or be cancelled")
    # plainly made, the call is the cancelled task's child: cancelled with it
    assert ray.get(probe.counts.remote()) == ((1, 1, 0) if detach else (1, 0, 1))
    for a in (probe, caller):
        ray.kill(a)
