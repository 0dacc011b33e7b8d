"""The router's request journal: accepted requests kept where a restarted router finds them.

Records live in the GCS's key-value store (the store Ray Serve's controller checkpoints into),
one key per request under `meshpipe/<deployment>/requests/`, so they outlive the router actor
(and, with GCS fault tolerance, the head node). A record is the request's prompt, sampling
parameters and deadline, written once; every second a checkpoint adds only the tokens generated
since the last one (a key of their own); a finished request's record carries its completion. A
restarted router re-admits each one and prefills prompt + generated tokens. Sampling is seeded per
position, so the continuation is the one the old router would have produced.

Records are versioned JSON (never pickles: a record cannot run code when read). With a deployment
key they are sealed with AES-256-GCM, the record's GCS key as associated data (a record moved to
another key fails to open), and a plaintext record is refused; without one they are plaintext,
readable by any job connected to the cluster. Finished records are kept up to `finished_kept`,
64 MiB and an hour, whichever comes first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from actors.detach import background
from actors.errors import DeploymentError
from actors.naming import NAMESPACE, journal_prefix, replicas_key

if TYPE_CHECKING:
    from actors.request import Request
    from actors.router import RouterActor

log = logging.getLogger(__name__)

FORMAT = 2  # the record format's version
PLAIN, SEALED = b"MPJ2p", b"MPJ2s"  # record prefixes
FINISHED_BYTES = 64 << 20  # finished records kept, in bytes at most
FINISHED_TTL_S = 3600.0  # ... and for an hour at most
GCS_TIMEOUT_S = 30  # a journal write that takes longer has failed


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

    async def put_async(self, key: str, value: bytes) -> None:
        """`put` without blocking the caller's event loop (many may be in flight)."""
        from ray.experimental.internal_kv import internal_kv_get_gcs_client

        gcs = internal_kv_get_gcs_client()
        await gcs.async_internal_kv_put(key.encode(), value, True, namespace=NAMESPACE.encode(), timeout=GCS_TIMEOUT_S)

    async def delete_async(self, key: str, by_prefix: bool = False) -> None:
        from ray.experimental.internal_kv import internal_kv_get_gcs_client

        gcs = internal_kv_get_gcs_client()
        await gcs.async_internal_kv_del(key.encode(), by_prefix, namespace=NAMESPACE.encode(), timeout=GCS_TIMEOUT_S)


class JournalWriter:
    """Journal writes issued off the router's event loop: every request's at once, each request's in order.

    One GCS round trip per record used to block the router's loop: ~3 per request, ~200 a batch of 64.
    Without a running event loop (tests, tools), or a store without `put_async`, a write happens at once.
    `flush(rids)` waits for every write queued so far and raises if a write of those requests that had to
    land failed (`must`: an admission, which its caller may only confirm once it is journaled); each
    caller hears of its own requests' failures only."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.queue: list[tuple[str, str, tuple, bool]] = []  # (request id, op, args, must)
        self.task: asyncio.Task | None = None
        self.queued: asyncio.Future | None = None  # done once the batch the queued writes go out in has landed
        self.writing: asyncio.Future | None = None  # the same, of the batch on its way
        self.failed: dict[str, BaseException] = {}  # request id -> why its `must` write failed (until flushed)
        self.failures = 0  # writes that failed (logged)

    def put(self, rid: str, key: str, blob: bytes, must: bool = False) -> None:
        self._submit(rid, "put", (key, blob), must)

    def delete(self, rid: str, key: str, by_prefix: bool = False) -> None:
        self._submit(rid, "delete", (key, by_prefix), False)

    def _submit(self, rid: str, op: str, args: tuple, must: bool) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or not hasattr(self.kv, "put_async"):
            getattr(self.kv, op)(*args)
            return
        self.queue.append((rid, op, args, must))
        if self.queued is None:
            self.queued = loop.create_future()
        if self.task is None or self.task.done():
            self.task = background(self._drain())

    async def flush(self, rids: Iterable[str] = ()) -> None:
        # only what was queued before this call: writes queued meanwhile (a busy router's checkpoints and
        # finishes, other admissions) would keep it waiting as long as the load lasts
        last = self.queued or self.writing
        if last is not None:
            await asyncio.shield(last)
        errors = [e for e in (self.failed.pop(rid, None) for rid in rids) if e is not None]
        if errors:
            raise errors[0]

    def drop_queued(self) -> None:
        """Forgets the writes not yet on their way (their flushes return)."""
        self.queue.clear()
        if self.queued is not None:
            self.queued.set_result(None)
            self.queued = None

    async def _drain(self) -> None:
        while self.queue:
            batch, self.queue = self.queue, []
            self.writing, self.queued = self.queued, None
            per_request: dict[str, list[tuple[str, tuple, bool]]] = {}
            for rid, op, args, must in batch:
                per_request.setdefault(rid, []).append((op, args, must))
            try:
                await asyncio.gather(*(self._in_order(rid, ops) for rid, ops in per_request.items()))
            finally:  # landed (or failed: said and kept for the flush), or cancelled: its flushes return
                if self.writing is not None and not self.writing.done():
                    self.writing.set_result(None)

    async def _in_order(self, rid: str, ops: list[tuple[str, tuple, bool]]) -> None:
        for op, args, must in ops:
            try:
                await getattr(self.kv, f"{op}_async")(*args)
            except Exception as e:  # noqa: BLE001 - the GCS is unreachable or slow: said, and raised on flush if must
                self.failures += 1
                log.warning("journal %s of %r failed: %s", op, args[0], e)
                if must:
                    self.failed.setdefault(rid, e)


class RequestJournal:
    """admit / checkpoint / finish / drop / load of one deployment's requests (`RequestRecord`s)."""

    def __init__(self, deployment: str, kv: Any = None, key: bytes | None = None, finished_kept: int = 1024) -> None:
        self.deployment, self.prefix, self.replicas_key = deployment, journal_prefix(deployment), replicas_key(deployment)
        self.kv = kv if kv is not None else GcsKV()  # anything with put/get/delete/keys (tests: a dict-backed one)
        self.writer = JournalWriter(self.kv)
        self.key = key  # AES-256-GCM key (the deployment's), or None: plaintext
        self.finished: OrderedDict[str, tuple[float, int]] = OrderedDict()  # rid -> (when, bytes), oldest first
        self.finished_kept = finished_kept
        self.finished_bytes = 0  # the finished records' sizes, summed
        self.evicted: set[str] = set()  # finished requests whose records `finish` deleted (the router drops each once)
        self.chunked: set[str] = set()  # requests with checkpoint chunks (keys of their own, deleted with them)

    def _put(self, rid: str, name: str, obj: dict[str, Any], must: bool = False) -> int:
        blob = seal_record(self.prefix + name, obj, self.key)
        self.writer.put(rid, self.prefix + name, blob, must)
        return len(blob)

    async def flush(self, rids: Iterable[str] = ()) -> None:
        """Waits until every record written so far is in the store; raises if the admission of one of
        `rids` failed."""
        await self.writer.flush(rids)

    def drop(self, rid: str) -> None:
        if rid in self.evicted:  # its record went with the oldest finished ones: nothing left to delete
            self.evicted.discard(rid)
            return
        self.finished_bytes -= self.finished.pop(rid, (0, 0))[1]
        self.writer.delete(rid, self.prefix + rid)
        self._drop_chunks(rid)

    def _drop_chunks(self, rid: str) -> None:
        if rid in self.chunked:
            self.chunked.discard(rid)
            self.writer.delete(rid, self.prefix + rid + "/", by_prefix=True)

    def load(self) -> list[RequestRecord]:
        """Every request's record, its token chunks joined; unreadable ones are skipped, and said so."""
        base: dict[str, dict] = {}
        chunks: dict[str, list[tuple[int, dict]]] = {}
        for key in self.kv.keys(self.prefix):
            raw = self.kv.get(key)
            if raw is None:
                continue
            name = key[len(self.prefix):]
            try:
                obj = open_record(key, raw, self.key)
            except ValueError as e:
                log.warning("journal record %r is unreadable (%s): skipped", name, e)
                continue
            rid, _, part = name.partition("/t/")
            if part:
                chunks.setdefault(rid, []).append((int(part), obj))
                self.chunked.add(rid)
            else:
                base[rid] = obj
        out = []
        for rid, obj in base.items():
            try:
                out.append(record_from(obj, sorted(chunks.get(rid, []), key=lambda c: c[0])))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("journal record %r is malformed (%s): skipped", rid, e)
        return out

    def keep_replicas(self, infos: list[list[dict[str, Any]]]) -> None:
        """The stages' `ready` infos as deployed: a restarted router's fallback for a stage it finds no
        named replica of (its constructor is given none: the router starts beside its stages)."""
        self.kv.put(self.replicas_key, seal_record(self.replicas_key, {"infos": infos}, self.key))

    def deployed_replicas(self) -> list[list[dict[str, Any]]]:
        raw = self.kv.get(self.replicas_key)
        try:
            if raw is None:
                raise ValueError("no record")
            return open_record(self.replicas_key, raw, self.key)["infos"]
        except (ValueError, KeyError, TypeError) as e:
            raise DeploymentError(f"the record of deployment {self.deployment!r}'s stages is unreadable ({e}): "
                                  "shut the deployment down and deploy it again") from None

    async def close(self) -> None:
        """A shutdown's clear: the writes already on their way land first (else they would outlive it)."""
        self.writer.drop_queued()
        await self.writer.flush()
        self.clear()

    def clear(self) -> None:
        self.writer.drop_queued()
        self.kv.delete(self.prefix, by_prefix=True)
        self.kv.delete(self.replicas_key)
        self.finished.clear()
        self.finished_bytes = 0
        self.evicted.clear()
        self.chunked.clear()

    def admit(self, req: Request) -> None:
        """An accepted request: a restarted router re-admits it from here."""
        self._put(req.rid, req.rid, record_dict(record_of(req)), must=True)
        req.journaled = len(req.seq.generated)

    def finish(self, req: Request, completion: Any) -> None:
        """A finished request: a late `result` after a restart finds its completion. Old finished records go."""
        size = self._put(req.rid, req.rid, record_dict(record_of(req, completion)))
        self._drop_chunks(req.rid)  # its tokens are in the completion
        now = time.time()
        self.finished_bytes += size - self.finished.pop(req.rid, (0, 0))[1]
        self.finished[req.rid] = (now, size)
        while self.finished and (len(self.finished) > self.finished_kept or self.finished_bytes > FINISHED_BYTES
                                 or now - next(iter(self.finished.values()))[0] > FINISHED_TTL_S):
            rid, (_, size) = self.finished.popitem(last=False)
            self.finished_bytes -= size
            self.writer.delete(rid, self.prefix + rid)
            self.evicted.add(rid)

    def checkpoint(self, reqs: list[Request]) -> int:
        """Journals the tokens each request generated since its last checkpoint (only those); returns how
        many requests had some."""
        n = 0
        for req in reqs:
            start = req.journaled
            if len(req.seq.generated) > start and not req.future.done():
                lps = req.seq.logprobs[start:] if req.seq.params.logprobs is not None else []
                self._put(req.rid, f"{req.rid}/t/{start:09d}", {"generated": req.seq.generated[start:],
                                                                "logprobs": [asdict(lp) for lp in lps]})
                self.chunked.add(req.rid)
                req.journaled = len(req.seq.generated)
                n += 1
        return n


def incarnation_of(restarts: int | None) -> int:
    """A router's incarnation from Ray's restart count: 0 only on a first start, the one case that clears
    the journal. An unknown count (the GCS could not say) counts as a restart: fail closed, keep it."""
    return 1 if restarts is None else restarts


def record_of(req: Request, completion: Any = None) -> RequestRecord:
    """The journal's record of a request now (its deadline as wall-clock time)."""
    deadline = None if req.deadline is None else time.time() + (req.deadline - time.monotonic())
    return RequestRecord(req.rid, req.seq.prompt, req.seq.params, deadline, list(req.seq.generated),
                         list(req.seq.logprobs), completion)


def seal_record(name: str, obj: dict[str, Any], key: bytes | None) -> bytes:
    """A record's bytes: versioned JSON, sealed with AES-256-GCM (`name` as associated data) under `key`."""
    raw = json.dumps({"v": FORMAT, **obj}, separators=(",", ":")).encode()
    if key is None:
        return PLAIN + raw
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return SEALED + nonce + AESGCM(key).encrypt(nonce, raw, name.encode())


def open_record(name: str, blob: bytes, key: bytes | None) -> dict[str, Any]:
    """The record `seal_record` wrote; ValueError when it is of another format, forged, moved, or plaintext
    where a key is set (fail closed: never read what could have been written without the key)."""
    if blob.startswith(SEALED):
        if key is None:
            raise ValueError("sealed with a key this router does not have")
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = blob[len(SEALED):]
        try:
            raw = AESGCM(key).decrypt(body[:12], body[12:], name.encode())
        except InvalidTag:
            raise ValueError("it fails authentication (another key, altered, or moved)") from None
    elif blob.startswith(PLAIN):
        if key is not None:
            raise ValueError("plaintext, but this deployment seals its records")
        raw = blob[len(PLAIN):]
    else:
        raise ValueError("not a meshpipe journal record of this version")
    obj = json.loads(raw)
    if not isinstance(obj, dict) or obj.get("v") != FORMAT:
        raise ValueError(f"record format {obj.get('v') if isinstance(obj, dict) else '?'} is not {FORMAT}")
    return obj


def record_dict(rec: RequestRecord) -> dict[str, Any]:
    """A record as plain JSON types."""
    return {"rid": rec.rid, "prompt": rec.prompt, "params": asdict(rec.params), "deadline_unix": rec.deadline_unix,
            "generated": rec.generated, "logprobs": [asdict(lp) for lp in rec.logprobs],
            "completion": None if rec.completion is None else asdict(rec.completion)}


def record_from(obj: dict[str, Any], chunks: list[tuple[int, dict]]) -> RequestRecord:
    """The record of `record_dict`, with the checkpoints' token chunks appended in order."""
    from models import Completion, SamplingParams, TokenLogprob

    def lp(d: dict) -> TokenLogprob:
        return TokenLogprob(int(d["token_id"]), float(d["logprob"]), {int(k): float(v) for k, v in d["top"].items()})

    generated, logprobs = list(obj["generated"]), [lp(d) for d in obj["logprobs"]]
    for start, chunk in chunks:
        if start == len(generated):  # contiguous; a stale or duplicate chunk is ignored
            generated += chunk["generated"]
            logprobs += [lp(d) for d in chunk["logprobs"]]
    params = obj["params"]
    done = obj["completion"]
    completion = None if done is None else Completion(**{**done, "logprobs": None if done["logprobs"] is None
                                                         else [lp(d) for d in done["logprobs"]]})
    return RequestRecord(str(obj["rid"]), [int(t) for t in obj["prompt"]],
                         SamplingParams(**{**params, "stop": tuple(params["stop"])}), obj["deadline_unix"],
                         generated, logprobs, completion)


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
    from actors.request import admission_order

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
    router.waiting.extend(sorted(resumed, key=lambda r: admission_order(r.rid)))
    router._schedule()


async def ensure_resumed(router: RouterActor) -> None:
    """`resume`, once: every call that arrives meanwhile waits for it (a `result` or `cancel` must find the
    requests it names; before, calls racing the first one were answered "no request" and cancels lost)."""
    state = router._resumed
    if state is True:
        return
    if state is False:
        state = router._resumed = asyncio.ensure_future(resume(router))
    try:
        await asyncio.shield(state)
    except BaseException:  # the journal could not be read: the next call tries again
        if router._resumed is state and state.done():
            router._resumed = False
        raise
    router._resumed = True
