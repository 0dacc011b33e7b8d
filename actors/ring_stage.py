"""A stage replica's part in a decode ring: threads that receive, compute and send with no router in the loop.

The router (`actors.ring.RingDriver`) starts a ring over one route's replicas. Member k receives
from member k-1 and sends to member k+1 over a `TcpChannel` (blocking reads, no spinning); the
last member samples, sends the tokens straight back to member 0 and reports them to the router
in batches (one report in flight; tokens sampled meanwhile ride in the next) over a socket of its
own (`actors.reports`; a Ray call where that socket cannot be set up). Member 0, the *head*, owns
the sequences: it feeds each lane (micro-batch) its next tokens as soon as the
lane's tokens come back, lets admitted sequences join and cancelled or finished ones leave
between steps, and frees their caches down the ring with the next message (`release`). The
tail decides end-of-sequence (EOS, max_new_tokens, context) exactly as `SequenceState.add`
does; stop strings and deadlines are the router's, which cancels at the head.

Every message is an `actors.wire` message (checksum, per-link codec and encryption); a corrupted
one is asked again from its sender (a Ray call, off the per-token path). Speculative sequences
send drafts (prompt lookup, or the stage's draft model); the tail samples every drafted position
with its own seeded draw and keeps drafts while they agree, so tokens equal plain decoding's;
rejected positions are rewound (only positions a pass drafted may be rewritten: anything else is
still a replay).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from actors.channels import ChannelError, TcpChannel, TcpListener, node_ip
from actors.reports import ReportSender, Trace
from actors.wire import ChecksumError, Header, LinkCodec, pack, peek_header, unpack
from models import SamplingParams
from models.batch import long_tensor
from models.generation import plan_chunks
from models.speculative import PROBE_AFTER, adapt_budget, draft_budget_of, propose_drafts, tail_index, verify

if TYPE_CHECKING:
    from actors.stage import StageActor

log = logging.getLogger(__name__)

SENT_KEPT = 16  # messages each member can resend
REPORT_EVERY_S = 0.015  # the tail reports tokens at most this often, unless a sequence starts or ends
STOP = object()


@dataclass
class RingSpec:
    """What the router tells each member of a ring."""

    ring_id: str  # unique per ring (the router's incarnation and a counter)
    index: int  # this member's stage
    size: int  # members (the route's stages)
    links: list[LinkCodec]  # links[k]: how the message into member k is encoded; links[0]: the tokens back
    router: Any  # the router's handle: token reports and failures
    members: list[Any]  # every member's handle (resends)
    names: list[str]  # every member's actor name
    secret: bytes = field(repr=False, default=b"")  # proves a TCP peer belongs to this ring
    eos_ids: frozenset[int] = frozenset()
    max_seq_len: int = 0
    prefill_chunk: int = 1 << 30  # prompt tokens a pass may carry (chunked prefill)
    reports: tuple[str, int] | None = None  # the router's `ReportServer` (None: reports are Ray calls)


@dataclass
class SeqState:
    """A sequence as the ring holds it (the head: what to feed next; the tail: what ends it)."""

    rid: str
    params: SamplingParams
    tokens: list[int]  # prompt + generated so far (the head drafts from it)
    generated: int  # tokens generated so far
    start: int = 0  # positions cached on every stage
    pending: list[int] = field(default_factory=list)  # head: tokens to feed next
    lane: int = 0
    drafts: list[int] = field(default_factory=list)  # head: drafts in flight
    fresh: bool = True  # tail: nothing sampled since it joined (its first token is reported at once)
    budget: int = 0  # head: drafts the next pass may send (`adapt_budget`; starts at params.speculative)
    paused: int = 0  # head: passes without drafts since the budget fell to 0
    sent: int = 0  # head: inputs the pass in flight carries (a prompt chunk may leave some pending)


class RingMember:
    """One member's threads and state; `stage` computes (under its lock) and keeps the caches."""

    def __init__(self, stage: StageActor, spec: RingSpec, lanes: int) -> None:
        self.stage, self.spec, self.lanes = stage, spec, max(1, lanes)
        self.name = spec.names[spec.index]
        self.is_head, self.is_tail = spec.index == 0, spec.index == spec.size - 1
        self.listener = TcpListener(node_ip()) if spec.size > 1 else None
        self.inbound: TcpChannel | None = None
        self.outbound: TcpChannel | None = None
        self.inbox: queue.Queue = queue.Queue()  # head: admissions and cancels
        self.head_lock = threading.Lock()  # head: the sequences and lanes (its loop and its reader)
        self.seqs: dict[str, SeqState] = {}  # head: the sequences it feeds
        self.tail_seqs: dict[str, SeqState] = {}  # tail: what ends each sequence
        self.in_flight: set[int] = set()  # head: lanes with a step out
        self.flying: dict[int, dict[str, SeqState]] = {}  # head: each lane's step out, its sequences' states
        self.release: list[str] = []  # head: sequences whose caches go with the next message
        self.sent: OrderedDict[int, Any] = OrderedDict()  # msg id -> wire, for resends
        self.step = 0
        self.msg_ids = secrets.randbits(40)  # never a previous ring's ids (stages refuse replayed ids)
        self.stopped = False
        self.threads: list[threading.Thread] = []
        self.reports: list[tuple] = []  # tail: (rid, tokens, logprobs, drafted, accepted, tokens generated before)
        self.report_passes: list[tuple[int, Trace]] = []  # tail: (input tokens, trace) of each pass
        self.report_released: list[str] = []  # tail: sequences released since the last report
        self.report_cond = threading.Condition()
        self.report_now = False  # a sequence's first token or its end is waiting: no batching delay
        self.last_report = 0.0
        self.retransmits = 0  # resends this member asked since its last message
        self.report_out: ReportSender | None = None  # tail: the socket its reports take

    def address(self) -> tuple[str, int] | None:
        return None if self.listener is None else (self.listener.host, self.listener.port)

    # ---------- setup and teardown ----------

    def start(self, next_addr: tuple[str, int] | None, timeout_s: float) -> None:
        """Connects to the next member, accepts the previous one, starts the threads."""
        s = self.spec
        if s.size > 1:  # runs beside the stage's other calls (`StageActor.ring_start`): a `stop` meanwhile
            # closes the listener, so a member that died before connecting holds nothing up
            nxt, prev = s.names[(s.index + 1) % s.size], s.names[s.index - 1]
            self.outbound = TcpChannel.connect(self.name, nxt, *next_addr, secret=s.secret, timeout_s=timeout_s)
            self.inbound = self.listener.accept(s.secret, self.name, prev, timeout_s)
            self.listener.close()
        if self.stopped:  # what it opened after the stop closed the rest
            for ch in (self.inbound, self.outbound):
                if ch is not None:
                    ch.close()
            raise ChannelError(f"{self.name}: ring {s.ring_id} was stopped while it started")
        if self.is_tail and s.reports is not None:
            try:
                self.report_out = ReportSender(*s.reports, s.ring_id, s.secret, timeout_s)
            except OSError as e:  # the router's port is unreachable from here: reports go as Ray calls
                log.warning("%s: ring %s reports by Ray call (no socket to the router: %s)", self.name, s.ring_id, e)
        loops = [self._head_loop] if self.is_head else []
        if s.size > 1:
            loops.append(self._reader)
        if self.is_tail:
            loops.append(self._reporter)
        for fn in loops:
            t = threading.Thread(target=self._guard, args=(fn,), name=f"ring-{fn.__name__}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the threads (no failure report); the stage keeps its caches for the router to rewind."""
        self.stopped = True
        self.inbox.put(STOP)
        for ch in (self.inbound, self.outbound, self.report_out):
            if ch is not None:
                ch.close()
        if self.listener is not None:
            self.listener.close()
        with self.report_cond:
            self.report_cond.notify_all()
        deadline = time.monotonic() + timeout_s  # for every thread together
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        if self.is_head and self.stage.drafter is not None:  # the router rewinds; drafts start afresh
            self.stage.drafter.release(list(self.seqs))

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure breaks the ring; the router recovers
            if not self.stopped:  # a peer gone (it stopped first, or died) is the router's to report
                log.log(logging.INFO if isinstance(e, ConnectionError) else logging.WARNING, "%s: ring %s failed: %s",
                        self.name, self.spec.ring_id, e)
                self.spec.router.ring_failed.remote(self.spec.ring_id, self.name, f"{type(e).__name__}: {e}")
                self.stop(timeout_s=0.0)

    # ---------- the head: admissions, cancels, tokens back ----------

    def admit(self, items: list[tuple[str, list[int], int, int, SamplingParams]]) -> None:
        """(rid, tokens so far, positions cached, tokens generated, params) per joining sequence."""
        self.inbox.put(("admit", items))

    def cancel(self, rids: list[str]) -> None:
        self.inbox.put(("cancel", rids))

    def _head_loop(self) -> None:
        """Admissions and cancels; with one stage, also the steps (nothing comes back over a channel)."""
        while not self.stopped:
            with self.head_lock:  # block only when no lane can step
                ready = bool(self.release) or any(q.lane not in self.in_flight for q in self.seqs.values())
            items = [] if ready else [self.inbox.get()]
            while True:  # everything already queued joins this round
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            with self.head_lock:
                for item in items:
                    if item is STOP:
                        return
                    self._handle(item)
                self._pump()

    def _pump(self) -> None:
        """Sends every lane that has sequences and no step out (caller holds `head_lock`)."""
        sent = False
        for lane in range(self.lanes):
            members = [q for q in self.seqs.values() if q.lane == lane]
            if members and lane not in self.in_flight:
                self._head_step(lane, members)
                sent = True
        if self.release and not sent:  # nothing going down the ring soon: free now
            self._head_step(0, [])

    def _handle(self, item: tuple[str, Any]) -> None:
        kind, body = item[0], item[1]
        if kind == "admit":
            loads = [sum(q.lane == ln for q in self.seqs.values()) for ln in range(self.lanes)]
            for rid, tokens, cached, generated, params in body:
                lane = min(range(self.lanes), key=loads.__getitem__)
                loads[lane] += 1
                self.seqs[rid] = SeqState(rid, params, list(tokens), generated, start=cached,
                                          pending=list(tokens[cached:]), lane=lane, budget=params.speculative)
        elif kind == "cancel":  # also ids it never got (cancelled on the way): their pinned prefixes go too
            for rid in body:
                self.seqs.pop(rid, None)
                self.release.append(rid)
        elif kind == "tokens":
            header, tokens = body
            self.in_flight.discard(header.lane)
            sent = self.flying.pop(header.lane, {})
            done, row = set(header.release), 0
            partial = set(header.partial)
            for rid, n in zip(header.seq_ids, header.lengths):
                got, row = tokens[row:row + n], row + n
                q = self.seqs.get(rid)
                if q is None or sent.get(rid) is not q:
                    continue  # cancelled while its step was out (and maybe admitted again since)
                if rid in partial:  # a prompt chunk went through: the next one, or the rest, follows
                    q.start, q.pending = q.start + q.sent, q.pending[q.sent:]
                    continue
                if rid in done:
                    del self.seqs[rid]
                    self.release.append(rid)
                    continue
                q.start += len(q.pending) + n - 1  # the inputs, and the drafts the tail confirmed
                q.tokens += got
                q.generated += n
                if q.params.speculative:
                    q.budget = adapt_budget(q.budget, q.params.speculative, len(q.drafts), n - 1)
                q.pending, q.drafts = [got[-1]], []

    def _head_step(self, lane: int, members: list[SeqState]) -> None:
        takes = plan_chunks([len(q.pending) for q in members], self.spec.prefill_chunk)
        members = [q for q, t in zip(members, takes) if t]  # prompts past this pass's budget wait a pass
        partial, wants = [], []
        for q, take in zip(members, [t for t in takes if t]):
            q.sent, q.drafts = take, []
            if take < len(q.pending):  # a prompt chunk: no drafts, nothing sampled
                partial.append(q.rid)
                continue
            k = draft_budget_of(q.params, q.generated, len(q.tokens), self.spec.max_seq_len)
            if q.params.speculative:
                q.paused = q.paused + 1 if q.budget == 0 else 0
                if q.paused >= PROBE_AFTER:  # try one draft again: the text may have turned repetitive
                    q.budget, q.paused = 1, 0
                k = min(k, q.budget)
            if k:
                wants.append((q, k))
        self._draft(wants)
        inputs = [q.pending[:q.sent] + q.drafts for q in members]
        spec = any(q.drafts for q in members)
        self.step += 1
        self.msg_ids += 1
        header = Header(kind="step", step=self.step, msg_id=self.msg_ids, attempt=0, sender=self.name,
                        seq_ids=[q.rid for q in members], starts=[q.start for q in members],
                        lengths=[len(x) for x in inputs], release=self.release, lane=lane,
                        drafts=[list(q.drafts) for q in members] if spec else [],
                        tokens=[t for xs in inputs for t in xs], partial=partial)
        if self.release and self.stage.drafter is not None:
            self.stage.drafter.release(self.release)
        self.release = []
        if members:
            self.in_flight.add(lane)
            self.flying[lane] = {q.rid: q for q in members}
        header.lanes = max(1, len(self.in_flight))
        x = long_tensor(header.tokens)  # (N,)
        self.stage.compute.run(self._compute_and_pass, header, x, time.time())

    def _draft(self, wants: list[tuple[SeqState, int]]) -> None:
        """Each sequence's drafts (up to its k): the stage's draft model's greedy ones, else prompt lookup."""
        drafter = self.stage.drafter
        if drafter is None or not wants:
            for q, k in wants:
                q.drafts = propose_drafts(q.tokens, k)
            return
        drafts = self.stage.compute.run(drafter.propose, [(q.rid, q.tokens, k) for q, k in wants])
        for (q, _), d in zip(wants, drafts):
            q.drafts = d

    # ---------- every member: receive, compute, send ----------

    def _reader(self) -> None:
        while not self.stopped:
            wire = self.inbound.recv_bytes()
            t0 = time.perf_counter()
            header, x = self._open(wire)
            self.stage.phase("receive", time.perf_counter() - t0)
            if self.is_head:  # the tail's tokens: the next step leaves from this thread (no hand-over)
                with self.head_lock:
                    self._handle(("tokens", (header, x.tolist())))
                    self._pump()
            else:
                self.stage.compute.run(self._compute_and_pass, header, x, time.time())

    def _compute_and_pass(self, header: Header, x: torch.Tensor, received: float) -> None:
        st = self.stage
        inbound_ms = st._arrive(received)  # its wait since it arrived (the slow-link test hook's delay too)
        t0 = time.perf_counter()
        if self.is_tail:
            for rid in header.release:
                self.tail_seqs.pop(rid, None)
            with self.report_cond:  # the router waits for this before it admits a preempted sequence again
                self.report_released += header.release
        at = tail_index(header.lengths, [len(d) + 1 for d in header.drafts]) \
            if self.is_tail and header.drafts else None
        y = st.apply(header, x, logits_at=at, ring=True)
        hop = [st.spec.index, st.replica, inbound_ms, 0.0, self.retransmits]
        self.retransmits = 0
        if not header.seq_ids:  # a release-only message: on to the tail, which reports its resends and drops it
            if self.is_tail:
                self._reported([], False, 0, [*header.trace, hop])
            else:
                self._send(header, y, [*header.trace, hop])
            return
        if not self.is_tail:
            t1 = time.perf_counter()
            hop[3] = (t1 - t0) * 1e3
            wire = self._send(header, y, [*header.trace, hop])
            t2 = time.perf_counter()
            st.phase("send", t2 - t1)
            st.account(t2 - t0, y, wire)
            return
        urgent = any(self.tail_seqs[rid].fresh for rid in header.seq_ids if rid not in header.partial)  # a first token
        t1 = time.perf_counter()
        tokens, done, lengths, reports = self._sample(header, y)
        t2 = time.perf_counter()
        st.phase("sample", t2 - t1)
        hop[3] = (t2 - t0) * 1e3
        trace = [*header.trace, hop]
        out = Header(kind="tokens", step=header.step, msg_id=header.msg_id, attempt=0, sender=self.name,
                     seq_ids=header.seq_ids, starts=header.starts, lengths=lengths, release=done,
                     lane=header.lane, trace=trace, partial=header.partial)
        if self.is_head:
            self._handle(("tokens", (out, tokens)))
        else:
            self._send(out, long_tensor(tokens), trace)
        self._reported(reports, bool(done) or urgent, sum(header.lengths), trace)
        st.account(time.perf_counter() - t0, y)

    def _reported(self, reports: list[tuple], now: bool, tokens: int, trace: list[list[float]]) -> None:
        """Tail: a pass's tokens and its trace wait for the reporter (every pass's trace goes: the router
        counts each pass's resends and times, none overwritten by the next)."""
        with self.report_cond:
            self.reports += reports
            self.report_now = self.report_now or now
            self.report_passes.append((tokens, trace))
            self.report_cond.notify_all()

    def _send(self, header: Header, y: torch.Tensor, trace: list[list[float]]) -> Any:
        """Encodes and sends to the next member; returns the encoded message."""
        link = self.spec.links[(self.spec.index + 1) % self.spec.size]
        mine = {"attempt": 0, "sender": self.name, "trace": trace}  # pack fills shape, dtype, codec
        try:
            wire = pack(header, y, link, self.stage.key, **mine)
        except ValueError:  # int8 cannot carry inf/NaN: this one goes lossless
            wire = pack(header, y, LinkCodec(encrypt=link.encrypt), self.stage.key, **mine)
        self.sent[header.msg_id] = wire
        while len(self.sent) > SENT_KEPT:
            self.sent.popitem(last=False)
        bad = self.stage._inject(wire)
        self.outbound.send_bytes(b"" if bad is None else bad)
        return wire

    def resend(self, msg_id: int) -> Any:
        """A message this member sent, again (-1: the last one)."""
        if msg_id == -1 and self.sent:
            msg_id = next(reversed(self.sent))
        if msg_id not in self.sent:
            raise ChecksumError(f"{self.name} no longer has ring message {msg_id}")
        self.stage.counters["resends"] += 1
        again = self.stage._inject(self.sent[msg_id])  # a link that keeps failing fails resends too
        return b"" if again is None else again

    def _open(self, wire: Any) -> tuple[Header, torch.Tensor]:
        """Verifies a message; a corrupted one is asked again from the previous member (max_retransmits)."""
        import ray

        st, asked = self.stage, 0
        while True:
            try:
                header, x = unpack(wire, st.key)
                st._expect_sealed(header, self.spec.links[self.spec.index].encrypt)
                return header, x
            except ChecksumError as e:
                st.counters["checksum_failures"] += 1
                if asked >= st.max_retransmits:
                    st.counters["rejected"] += 1
                    raise
                asked += 1
                self.retransmits += 1
                st.counters["retransmits_asked"] += 1
                log.warning("%s: a ring message failed verification (%s); asking for it again", self.name, e)
                try:
                    msg_id = peek_header(wire).msg_id
                except Exception:  # noqa: BLE001 - the header itself is garbled (or dropped): the last one sent
                    msg_id = -1
                prev = self.spec.members[self.spec.index - 1]
                wire = ray.get(prev.ring_resend.remote(self.spec.ring_id, msg_id), timeout=30)

    # ---------- the tail: sampling, end of sequence, reports ----------

    def params(self, items: dict[str, tuple[SamplingParams, int]]) -> None:
        """(params, tokens generated so far) of sequences about to join (before their first step)."""
        for rid, (params, generated) in items.items():
            self.tail_seqs[rid] = SeqState(rid, params, [], generated)

    def _sample(self, header: Header, logits: torch.Tensor) -> tuple[list[int], list[str], list[int], list[Any]]:
        """Tokens per sequence (the draws that confirm drafts, then one more), the sequences that ended
        (EOS, max_new_tokens or context: `SequenceState.add`'s rules), and the router's reports."""
        drafts = header.drafts or [[] for _ in header.seq_ids]
        views = [_Verify(start, self.tail_seqs[rid].params) for rid, start in zip(header.seq_ids, header.starts)]
        results = verify(logits, views, drafts, [[0] * n for n in header.lengths])
        tokens, done, lengths, reports = [], [], [], []
        for rid, start, n, d, (toks, lps, n_acc) in zip(header.seq_ids, header.starts, header.lengths, drafts, results):
            if rid in header.partial:  # mid-prompt: nothing to sample yet
                lengths.append(0)
                continue
            q = self.tail_seqs[rid]
            q.fresh, before = False, q.generated
            first = start + n - len(d)  # the first sampled token's position
            kept, ended = [], False
            for j, t in enumerate(toks):
                kept.append(t)
                if t < 0 or t in self.spec.eos_ids and not q.params.ignore_eos:  # < 0: NaN logits (the router
                    ended = True  # ends it with NonFiniteLogitsError)
                    break
                q.generated += 1
                if q.generated >= q.params.max_new_tokens or first + j + 1 >= self.spec.max_seq_len:
                    ended = True
                    break
            if ended:
                done.append(rid)
                del self.tail_seqs[rid]
            tokens += kept
            lengths.append(len(kept))
            reports.append((rid, kept, lps[:len(kept)], len(d), min(n_acc, len(kept)), before))
        return tokens, done, lengths, reports

    def _reporter(self) -> None:
        """Sends the sampled tokens to the router: one call in flight, what arrives meanwhile rides next."""
        import ray

        while True:
            with self.report_cond:
                while not self.report_passes and not self.stopped:
                    self.report_cond.wait()
                due = self.last_report + REPORT_EVERY_S  # batching: each report call costs both ends CPU
                while not self.report_now and not self.stopped and time.monotonic() < due:
                    self.report_cond.wait(due - time.monotonic())
                if self.stopped:
                    return
                batch, passes, released = self.reports, self.report_passes, self.report_released
                self.reports, self.report_passes, self.report_released, self.report_now = [], [], [], False
            if self.report_out is not None:
                self.report_out.send(batch, passes, released)
            else:
                ray.get(self.spec.router.ring_tokens.remote(self.spec.ring_id, batch, passes, released))
            self.last_report = time.monotonic()


@dataclass
class _Verify:
    """What `models.speculative.verify` reads of a sequence."""

    cached: int
    params: SamplingParams
