"""Calls made `detached`, and tasks started in the `background`, survive the recursive cancel of the Ray
task that made them (Ray Serve's, when a client leaves).

The controls show the tests can fail: the same call made plainly, or from a plainly created asyncio
task, is cancelled with its parent.
"""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.detach import background, detached
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
            await asyncio.sleep(3.0)  # the controls' cancel must land first (1 s was tight under load)
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

    async def start_loop_then_wait(self, probe: ray.actor.ActorHandle, own_task: bool) -> None:
        """Starts a long-lived task that calls the probe, as an actor starts its loops on a first call."""
        async def loop() -> None:
            await probe.slow.remote()  # made inside the task

        self.loop = (background if own_task else asyncio.ensure_future)(loop())
        await asyncio.sleep(60)


def _cancel_and_count(method: str, detach: bool) -> tuple[int, int, int]:
    probe, caller = Probe.remote(), Caller.remote()
    ref = getattr(caller, method).remote(probe, detach)
    wait_for(lambda: ray.get(probe.counts.remote())[0] == 1, 30, "the probe's call to begin")
    ray.cancel(ref)  # recursive, as Ray Serve cancels a request whose client left
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    wait_for(lambda: sum(ray.get(probe.counts.remote())[1:]) == 1, 30, "the probe's call to end or be cancelled")
    counts = ray.get(probe.counts.remote())
    for a in (probe, caller):
        ray.kill(a)
    return counts


@pytest.mark.parametrize("detach", [False, True])
def test_a_detached_call_outlives_its_callers_recursive_cancel(detach: bool) -> None:
    # plainly made, the call is the cancelled task's child: cancelled with it
    assert _cancel_and_count("call_then_wait", detach) == ((1, 1, 0) if detach else (1, 0, 1))


@pytest.mark.parametrize("own_task", [False, True])
def test_a_background_tasks_calls_outlive_the_call_that_started_it(own_task: bool) -> None:
    # a plain asyncio task inherits its creator's Ray task: its calls are that task's children
    assert _cancel_and_count("start_loop_then_wait", own_task) == ((1, 1, 0) if own_task else (1, 0, 1))
