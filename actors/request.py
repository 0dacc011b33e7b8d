"""A request as the router holds it, and the lane (micro-batch) it runs in."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from models import SequenceState
from topology.planner import Route


@dataclass
class Request:
    rid: str  # the request id (unique in the deployment)
    seq: SequenceState  # prompt, sampling parameters and the tokens so far
    kv_tokens: int  # reserved KV budget: prompt + max_new_tokens
    deadline: float | None  # time.monotonic() after which it times out
    future: asyncio.Future  # its Completion, or the error that ended it
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set when tokens arrive (streams wait on it)
    lane: Lane | None = None  # the lane it decodes in (None while waiting)
    route: Route | None = None  # the replicas holding its KV cache, chosen when it starts
    journaled: int = 0  # generated tokens in its journal record
    copies: dict[int, tuple[int, int]] = field(default_factory=dict)  # stage -> (standby replica, positions copied)


@dataclass
class Lane:
    """One micro-batch that loops down the pipeline on its own; sequences join and leave between steps."""

    index: int
    seqs: list[Request] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0  # steps run so far
