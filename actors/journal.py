"""The router's request journal: accepted requests kept where a restarted router finds them.

Records live in the GCS's key-value store (the store Ray Serve's controller checkpoints into),
one key per request under `meshpipe/<deployment>/requests/`, so they outlive the router actor
(and, with GCS fault tolerance, the head node). A record is the request's prompt, sampling
parameters, deadline and the tokens generated so far (checkpointed every second); a restarted
router re-admits each one and prefills prompt + generated tokens. Sampling is seeded per position,
so the continuation is the one the old router would have produced.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.naming import NAMESPACE, journal_prefix

if TYPE_CHECKING:
    from actors.request import Request
    from actors.router import RouterActor

log = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    rid: str
    prompt: list[int]  # token ids
    params: Any  # SamplingParams (with its seed)
    deadline_unix: float | None  # time.time() after which the request times out
    generated: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    completion: Any = None  # the Completion once finished (kept until the router forgets it)


class GcsKV:
    """The GCS key-value store in meshpipe's namespace (what a restarted router reads back)."""

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key, namespace=NAMESPACE)

    def delete(self, key: str, by_prefix: bool = False) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(key, del_by_prefix=by_prefix, namespace=NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental import internal_kv

        return [k.decode() if isinstance(k, bytes) else k for k in internal_kv._internal_kv_list(prefix, namespace=NAMESPACE)]


class RequestJournal:
    """put / drop / load of one deployment's RequestRecords (pickled: written and read by meshpipe only)."""

    def __init__(self, deployment: str, kv: Any = None) -> None:
        self.prefix = journal_prefix(deployment)
        self.kv = kv if kv is not None else GcsKV()  # anything with put/get/delete/keys (tests: a dict-backed one)

    def put(self, record: RequestRecord) -> None:
        self.kv.put(self.prefix + record.rid, pickle.dumps(record))

    def drop(self, rid: str) -> None:
        self.kv.delete(self.prefix + rid)

    def load(self) -> list[RequestRecord]:
        out = []
        for key in self.kv.keys(self.prefix):
            raw = self.kv.get(key)
            if raw is None:
                continue
            try:
                out.append(pickle.loads(raw))
            except Exception as e:  # noqa: BLE001 - a record of another meshpipe version: skip it, say so
                log.warning("journal record %r is unreadable (%s): skipped", key, e)
        return out

    def clear(self) -> None:
        self.kv.delete(self.prefix, by_prefix=True)

    def admit(self, req: Request) -> None:
        """An accepted request: a restarted router re-admits it from here."""
        self.put(record_of(req))

    def finish(self, req: Request, completion: Any) -> None:
        """A finished request: a late `result` after a restart finds its completion."""
        self.put(record_of(req, completion))

    def checkpoint(self, reqs: list[Request]) -> int:
        """Journals the tokens of the requests that generated some since their last record; returns how many."""
        n = 0
        for req in reqs:
            if len(req.seq.generated) != req.journaled and not req.future.done():
                self.put(record_of(req))
                req.journaled = len(req.seq.generated)
                n += 1
        return n


def record_of(req: Request, completion: Any = None) -> RequestRecord:
    """The journal's record of a request now (its deadline as wall-clock time)."""
    deadline = None if req.deadline is None else time.time() + (req.deadline - time.monotonic())
    return RequestRecord(req.rid, req.seq.prompt, req.seq.params, deadline, list(req.seq.generated),
                         list(req.seq.logprobs), completion)


def request_of_records(records: list[RequestRecord], cfg: Any) -> list[tuple[Request, Any]]:
    """A restarted router's requests, rebuilt from their records: (request, its completion or None)."""
    import asyncio

    from actors.request import Request
    from models import SequenceState

    loop = asyncio.get_running_loop()
    out = []
    for rec in records:
        seq = SequenceState(rec.rid, rec.prompt, rec.params, frozenset(cfg.eos_ids), cfg.max_seq_len,
                            generated=list(rec.generated), logprobs=list(rec.logprobs))
        kv = min(len(rec.prompt) + rec.params.max_new_tokens, cfg.max_seq_len) + rec.params.speculative
        deadline = None if rec.deadline_unix is None else time.monotonic() + (rec.deadline_unix - time.time())
        out.append((Request(rec.rid, seq, kv, deadline, loop.create_future(), journaled=len(rec.generated)),
                    rec.completion))
    return out


async def resume(router: RouterActor) -> None:
    """A restarted router: frees every stage's orphaned caches and re-admits the journal's requests."""
    records = router.journal.load()
    freed = await asyncio.gather(*[r.handle.reset.remote() for r in router.pool.table], return_exceptions=True)
    log.warning("router restarted (incarnation %d): %d requests from the journal; freed %d orphaned "
                "caches on the stages", router.incarnation, len(records), sum(x for x in freed if isinstance(x, int)))
    resumed = []
    for req, completion in request_of_records(records, router.cfg):
        router.requests[req.rid] = req
        if completion is not None:
            req.future.set_result(completion)
        else:
            resumed.append(req)
    router._ensure_started()
    router.resumed = len(resumed)
    router.waiting.extend(sorted(resumed, key=lambda r: r.rid))
    router._schedule()
