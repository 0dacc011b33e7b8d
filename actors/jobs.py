"""Background jobs of an async actor: fire-and-forget tasks that are kept alive and logged when they fail."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from actors.detach import background

log = logging.getLogger(__name__)


class Jobs:
    """Holds the actor's background tasks (asyncio keeps only weak references to running tasks)."""

    def __init__(self, what: str) -> None:
        self.what = what  # who runs them, for the log
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Any) -> asyncio.Task:
        """Runs `coro` in the background; its failure is logged, never raised into the caller."""
        task = background(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: background job failed: %s", self.what, task.exception())

    async def every(self, seconds: float, job: Callable[[], Any], stopped: Callable[[], bool],
                    first: bool = False) -> None:
        """Runs `job` (sync or async) every `seconds` until `stopped()` (`first`: once at once); a failed
        round (a GCS hiccup) is logged and retried, never the end of the loop."""
        if not first:
            await asyncio.sleep(seconds)
        while not stopped():
            try:
                out = job()
                if asyncio.iscoroutine(out):
                    await out
            except Exception as e:  # noqa: BLE001 - retried next round
                log.warning("%s: background job %s failed (retrying in %g s): %s", self.what,
                            getattr(job, "__name__", "job"), seconds, e)
            await asyncio.sleep(seconds)
