"""Calls made outside the calling Ray task, so that cancelling that task does not cancel them too.

`ray.cancel` is recursive by default: it cancels a task and every task it submitted, and Ray Serve
cancels a request's task that way when its HTTP client goes away. The request's cleanup (asking the
router to cancel the generation and free its caches) is submitted while that cancellation unwinds
the handler, so Ray counted it as a child of the cancelled task and, when its sweep came after the
submission, cancelled it before the router saw it: on this 2-core VM under load, 4 in 60 dropped
clients' generations ran to their end.

In async code Ray names a call's parent task from the `async_task_id` context variable; a call made
in a fresh `contextvars.Context` has none, so its parent is the worker's own, which no request's
cancel reaches.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any


def detached(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)` (a `.remote`) made outside the current asyncio task's Ray task: cancelling that task,
    recursively or not, leaves this call be."""
    return contextvars.Context().run(call, *args)


def background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """Runs `coro` as a task of its own, for an actor's long-lived loops and jobs: a task inherits the Ray
    task of the call that created it, which makes every call it ever makes that call's child, so one
    cancel of a call that happened to start it would also cancel them."""
    return contextvars.Context().run(asyncio.get_running_loop().create_task, coro)
