"""A request as the router holds it, and the lane (micro-batch) it runs in."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.errors import BackPressureError
from models import InvalidRequestError, ModelConfig, SamplingParams, SequenceState
from models.generation import plan_chunks
from topology.planner import Route

if TYPE_CHECKING:
    from actors.prefix import KvBudget


@dataclass
class Request:
    rid: str  # the request id (unique in the deployment)
    seq: SequenceState  # prompt, sampling parameters and the tokens so far
    kv_tokens: int  # the most positions it can hold: prompt + max_new_tokens, within the context
    deadline: float | None  # time.monotonic() after which it times out
    future: asyncio.Future  # its Completion, or the error that ended it
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set when tokens arrive (streams wait on it)
    lane: Lane | None = None  # the lane it decodes in (None while waiting)
    route: Route | None = None  # the replicas holding its KV cache, chosen when it starts
    journaled: int = 0  # generated tokens in its journal record
    copies: dict[int, tuple[int, int]] = field(default_factory=dict)  # stage -> (standby replica, positions copied)
    chunk: int = 0  # Ray-call path: prompt tokens of a chunk in flight (0: its whole next input)
    broken_at: float | None = None  # time.monotonic() its ring broke under a failure, until it steps again


@dataclass
class Lane:
    """One micro-batch that loops down the pipeline on its own; sequences join and leave between steps."""

    index: int
    seqs: list[Request] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0  # steps run so far


def chunked(reqs: list[Request], budget: int) -> list[Request]:
    """Chunked prefill: the requests going this step (`plan_chunks` of `budget` prompt tokens), each prompt
    chunk's size in its `chunk` (0: the whole rest, sampled this step)."""
    takes = plan_chunks([len(r.seq.next_input()) for r in reqs], budget)
    for r, take in zip(reqs, takes):
        r.chunk = take if take < len(r.seq.next_input()) else 0
    return [r for r, take in zip(reqs, takes) if take]


def check_room(deployment: str, active: int, queued: int, n: int, max_active: int, max_queued: int) -> None:
    """BackPressureError unless `n` more requests fit the active slots and the queue."""
    limit = max_active + max_queued
    if active + queued + n > limit:
        raise BackPressureError(
            f"pipeline {deployment!r} is full: {active} active and {queued} queued requests, {n} more would "
            f"pass the limit of {limit} (max_active_sequences={max_active} + max_queued={max_queued}); retry later"
        )


def new_request(rid: str, ids: list[int], params: SamplingParams, timeout_s: float | None, cfg: ModelConfig,
                kv: KvBudget) -> Request:
    """A request of a tokenised prompt, checked (a seed drawn if none is given); InvalidRequestError names
    what is wrong."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be SamplingParams, not {type(params).__name__}")
    if timeout_s is not None and not timeout_s > 0:
        raise InvalidRequestError(f"timeout_s={timeout_s!r} must be positive")
    if params.seed is None:
        params = SamplingParams(**{**vars(params), "seed": random.getrandbits(31)})
    limit = min(len(ids) + params.max_new_tokens, cfg.max_seq_len) + params.speculative  # drafts write ahead
    if not kv.fits_ever(limit):
        raise InvalidRequestError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs {limit} KV positions, "
            f"more than a stage's pool holds ({kv.one_pool() * kv.block_size}): lower max_new_tokens or deploy with "
            "a larger kv_cache_tokens")
    seq = SequenceState(rid, ids, params, frozenset(cfg.eos_ids), cfg.max_seq_len)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    return Request(rid, seq, limit, deadline, asyncio.get_running_loop().create_future())


class RequestIds:
    """Request ids unique across router incarnations, whatever a restarted router knows of its past: the
    deployment, a random tag of this router process, a count (`<deployment>-<tag>-<n>`)."""

    def __init__(self, deployment: str) -> None:
        self.prefix = f"{deployment}-{secrets.token_hex(4)}-"
        self.count = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.count)}"


def admission_order(rid: str) -> tuple[str, int]:
    """A sort key of request ids in the order one router admitted them (as strings, `...-10` came before `...-9`)."""
    head, _, n = rid.rpartition("-")
    return (head, int(n)) if n.isdigit() else (rid, -1)
