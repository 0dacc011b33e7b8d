"""Sending one step down a route: the envelope, the hops, and giving up when a replica dies.

`StepSender.step` seals a micro-batch's input tokens into an envelope for the route's first
stage, chains the stage calls (the router passes ObjectRefs on, or each stage calls the next in
"push" mode), and returns the last stage's envelope with the sampled tokens and the per-hop
trace. It keeps each step's first message until the step ends, so a stage that received it
corrupted can ask for it again (`resend`).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from typing import Any

import torch

from actors.pool import ReplicaPool
from actors.replicas import Replica
from actors.request import Request
from actors.wire import Envelope, Header
from models import InvalidRequestError, SamplingParams
from topology.planner import Route


class RouteBrokenError(RuntimeError):
    """(Internal.) A replica on a step's route died while the step was in flight; recovery follows."""


class StepSender:
    """Sends steps and rebuild messages along routes of the pool's replicas."""

    def __init__(self, pool: ReplicaPool, hop_mode: str, key: bytes | None, reply_to: Any) -> None:
        self.pool = pool
        self.hop_mode = hop_mode  # "router": the router chains ObjectRefs; "push": stage k calls stage k+1
        self.key = key  # AES-GCM key for hops the link policy encrypts
        self.reply_to = reply_to  # the router's own handle: stages ask it for resends
        self.outbox: dict[int, Any] = {}  # msg id -> first message of a step in flight (for resends)
        self.retransmits = 0  # corrupted messages sent again, over every step
        # a random start: ids of a restarted router never repeat its predecessor's (stages refuse replays)
        self._msg_ids = itertools.count(secrets.randbits(40) + 1)

    def next_id(self) -> int:
        return next(self._msg_ids)

    def resend(self, msg_id: int) -> Any:
        """A stage asks again for a step's first message that failed its checksum."""
        if msg_id not in self.outbox:
            raise InvalidRequestError(f"message {msg_id} is not in flight any more")
        return self.outbox[msg_id]

    async def step(self, step: int, route: Route, reqs: list[Request], kind: str = "step") -> Envelope:
        """One step of these requests' sequences (each its next input tokens) along `route`."""
        inputs = [r.seq.next_input()[:r.chunk or None] for r in reqs]  # a prompt chunk, or all
        msg_id = self.next_id()
        seq_ids = [r.rid for r in reqs]  # the caller holds them `carrying` (one may end on the way)
        freed = self.pool.table.take_release(route)
        header = Header(kind=kind, step=step, msg_id=msg_id, attempt=0, sender="router",
                        seq_ids=seq_ids, starts=[r.seq.cached for r in reqs],
                        lengths=[len(x) for x in inputs], release=sorted({i for ids in freed.values() for i in ids}),
                        tokens=[t for x in inputs for t in x], partial=[r.rid for r in reqs if r.chunk])
        links = self.pool.links_for(route)
        tokens = torch.tensor(header.tokens, dtype=torch.long)
        env = Envelope.seal(header, tokens, links[0], self.key, reply_to=self.reply_to, links=links)
        self.outbox[msg_id] = env.wire
        try:
            return await self._send(env, [r.seq.params for r in reqs], route)
        except BaseException:
            self.pool.table.give_back(freed)
            raise
        finally:
            del self.outbox[msg_id]

    async def _send(self, env: Envelope, params: list[SamplingParams], route: Route) -> Envelope:
        """Runs one envelope down the route's replicas; returns the last stage's envelope.

        Gives up as soon as the watcher sees a replica on the route die (RouteBrokenError), instead
        of waiting for Ray to fail the call once the actor has restarted (~2 s).
        """
        reps = self.pool.table.on_route(route)
        for r in reps:
            r.inflight += 1
        step = asyncio.ensure_future(self._chain(env, params, [r.handle for r in reps]))
        step.add_done_callback(lambda _: _landed(reps))
        watchers = [asyncio.ensure_future(self.pool.down_event(r).wait()) for r in reps]
        try:
            await asyncio.wait([step, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in watchers:
                w.cancel()
        if step.done():
            return step.result()
        step.cancel()  # stops waiting only: the message dies at the dead replica; later stages' calls fail
        # on their argument. Stages run calls out of order, so those do not hold up other routes' steps.
        down = [r.label for r in reps if self.pool.down_event(r).is_set()]
        raise RouteBrokenError(f"{', '.join(down)} died during the step")

    async def _chain(self, env: Envelope, params: list[SamplingParams], handles: list[Any]) -> Envelope:
        import ray

        env.sent_at = time.time()
        if self.hop_mode == "push":
            env.params = params
            env.hops = handles[1:]
            out: Any = await handles[0].forward.remote(env)
            while isinstance(out, ray.ObjectRef):  # each stage returned its successor's call
                out = await out
        else:
            ref: Any = env
            for h in handles[:-1]:
                ref = h.forward.remote(ref)
            out = await handles[-1].forward.remote(ref, params)
        self.retransmits += out.retransmits
        return out


def _landed(reps: list[Replica]) -> None:
    for r in reps:
        r.inflight -= 1
