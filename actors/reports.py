"""Token reports from a decode ring's tail to its router over one socket per ring, not a Ray call each.

A Ray call per report cost the tail and the router ~0.5-1 ms of CPU each on a 2-core VM (and the
tail's GIL while the call was built and its reply read); the tail reports every ~15 ms while
sequences decode, so those calls competed with the ring for the same cores (README: decode rings).

The router listens on its own event loop (`ReportServer`, asyncio); a ring's tail connects when the
ring starts (`ReportSender`), the router sends a fresh 32-byte challenge, and the tail proves the
ring's secret with an HMAC of the ring id and that challenge (a recorded hello opens nothing later).
One connection per ring: a second hello for a ring is refused. Each report is a
length-prefixed frame: an 8-byte counter, then the JSON report sealed with AES-256-GCM under a key
derived from the ring's secret, the counter as nonce and the ring id as associated data. Counters
must grow, per ring, so a frame cannot be replayed, reordered or moved to another ring; anything malformed
closes the connection (the tail's next send fails and the ring breaks: the router recovers its
sequences as for any ring failure). JSON only: a report never runs code when read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from actors.channels import close_socket
from models import TokenLogprob
from models.sampling import FAILED

log = logging.getLogger(__name__)

MAGIC = b"MPT2"
CHALLENGE_BYTES = 32
MAX_RING_ID = 256  # bytes
MAX_FRAME = 64 << 20  # a report longer than this is refused before it is read
HELLO_TIMEOUT_S = 10.0
_LEN = struct.Struct("<Q")

Trace = list[list[float]]  # a pass's hops: [stage, replica, inbound ms, compute ms, resends asked] each
# per sequence (rid, tokens, logprobs, drafted, drafts accepted among the tokens, tokens generated before);
# per pass since the last report (input tokens, trace): a release-only message's pass has 0 tokens; the
# sequences whose caches the ring released since (the router re-admits a preempted one only after that)
Report = tuple[list[tuple], list[tuple[int, Trace]], list[str]]


def report_key(secret: bytes) -> bytes:
    """The AES-256 key of a ring's reports (another key than any other use of the ring's secret)."""
    return hmac.new(secret, b"meshpipe ring reports v1", hashlib.sha256).digest()


def _hello_mac(secret: bytes, rid: bytes, challenge: bytes) -> bytes:
    """What proves a tail knows its ring's secret: an HMAC-SHA256 of the ring id and the router's challenge,
    under a key of its own."""
    key = hmac.new(secret, b"meshpipe ring report hello v2", hashlib.sha256).digest()
    return hmac.new(key, MAGIC + rid + challenge, hashlib.sha256).digest()


def hello_of(ring_id: str, secret: bytes, challenge: bytes) -> bytes:
    rid = ring_id.encode()
    if len(rid) > MAX_RING_ID:
        raise ValueError(f"ring id of {len(rid)} bytes: at most {MAX_RING_ID}")
    return MAGIC + struct.pack("<H", len(rid)) + rid + _hello_mac(secret, rid, challenge)


def encode_report(batch: list[tuple], passes: list[tuple[int, Trace]], released: list[str]) -> bytes:
    """A report as JSON: logprobs as [token id, logprob, [[id, logprob], ...]] (None where not asked), each
    pass as [input tokens, trace], then the released sequence ids."""
    def lp(x: TokenLogprob | None) -> Any:
        return None if x is None else [x.token_id, x.logprob, [[k, v] for k, v in x.top.items()]]

    rows = [[rid, list(tokens), [lp(x) for x in lps], drafted, accepted, before]
            for rid, tokens, lps, drafted, accepted, before in batch]
    return json.dumps([rows, [[n, trace] for n, trace in passes], list(released)], separators=(",", ":")).encode()


def decode_report(raw: bytes) -> Report:
    """`encode_report`'s report, every field's type checked; ValueError names what is wrong."""
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) or v == -math.inf

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def lp(v: Any) -> TokenLogprob | None:
        if v is None:
            return None
        if not (isinstance(v, list) and len(v) == 3 and count(v[0]) and num(v[1]) and isinstance(v[2], list)
                and all(isinstance(p, list) and len(p) == 2 and count(p[0]) and num(p[1]) for p in v[2])):
            raise ValueError("a report logprob is not [token id, logprob, [[id, logprob], ...]]")
        return TokenLogprob(v[0], float(v[1]), {k: float(x) for k, x in v[2]})

    def trace(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, list) and len(t) == 5 and count(t[0]) and count(t[1])
                                           and num(t[2]) and num(t[3]) and count(t[4]) for t in v)

    try:
        rows, passes, released = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        raise ValueError("a report is not [rows, passes, released] JSON") from None
    if not isinstance(rows, list) or not isinstance(passes, list) or \
            not all(isinstance(p, list) and len(p) == 2 and count(p[0]) and trace(p[1]) for p in passes):
        raise ValueError("a report's rows or passes are malformed")
    if not isinstance(released, list) or not all(isinstance(r, str) for r in released):
        raise ValueError("a report's released ids are not strings")
    batch = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 6 and isinstance(row[0], str) and isinstance(row[1], list)
                and all(count(t) or t == FAILED for t in row[1]) and isinstance(row[2], list) and count(row[3])
                and count(row[4])
                and row[4] <= min(row[3], len(row[1])) and count(row[5])):
            raise ValueError("a report row is not [request id, tokens, logprobs, drafted, accepted, before]")
        batch.append((row[0], row[1], [lp(x) for x in row[2]], row[3], row[4], row[5]))
    return batch, [(n, t) for n, t in passes], released


class ReportSender:
    """The tail's end: a blocking socket to the router's `ReportServer` (one thread sends)."""

    def __init__(self, host: str, port: int, ring_id: str, secret: bytes, timeout_s: float = 30.0) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.ring_id = ring_id.encode()
        self.aead = AESGCM(report_key(secret))
        self.counter = 0
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = b""
        while len(challenge) < CHALLENGE_BYTES:
            got = self.sock.recv(CHALLENGE_BYTES - len(challenge))
            if not got:
                raise ConnectionError("the router closed the report connection before its challenge")
            challenge += got
        self.sock.sendall(hello_of(ring_id, secret, challenge))
        self.sock.settimeout(None)

    def send(self, batch: list[tuple], passes: list[tuple[int, Trace]], released: list[str]) -> None:
        """One report; an OSError when the router's end is gone."""
        self.counter += 1
        nonce = self.counter.to_bytes(12, "little")
        body = nonce[:8] + self.aead.encrypt(nonce, encode_report(batch, passes, released), self.ring_id)
        self.sock.sendall(_LEN.pack(len(body)) + body)

    def close(self) -> None:
        close_socket(self.sock)


class ReportServer:
    """The router's end: accepts the tails of the rings it `allow`s, hands each report to `on_report`
    (ring id, batch, passes, released) on the event loop, in the order the tail sent them."""

    def __init__(self, on_report: Callable[[str, list[tuple], list[tuple[int, Trace]], list[str]], None],
                 host: str) -> None:
        self.on_report, self.host = on_report, host
        self.server: asyncio.Server | None = None
        self.port = 0
        self.keys: dict[str, bytes] = {}  # ring id -> its secret
        self.writers: dict[str, asyncio.StreamWriter] = {}
        self.last: dict[str, int] = {}  # ring id -> the counter of its last report (they must grow)
        self.received = 0  # reports handed on
        self.refused = 0  # connections closed for a bad hello or frame

    async def address(self) -> tuple[str, int]:
        """(host, port), listening from the first call on."""
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = self.server.sockets[0].getsockname()[1]
        return self.host, self.port

    def allow(self, ring_id: str, secret: bytes) -> None:
        self.keys[ring_id] = secret

    def forget(self, ring_id: str) -> None:
        """A ring that ended: its connection closes, a late connection is refused."""
        self.keys.pop(ring_id, None)
        self.last.pop(ring_id, None)
        writer = self.writers.pop(ring_id, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for ring_id in list(self.writers):
            self.forget(ring_id)
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ring_id = None
        try:
            challenge = os.urandom(CHALLENGE_BYTES)
            writer.write(challenge)
            await writer.drain()
            name, aead = await asyncio.wait_for(self._hello(reader, challenge), HELLO_TIMEOUT_S)
            if name in self.writers:
                raise ValueError("a second connection for a ring")
            ring_id = name
            self.writers[ring_id] = writer
            while True:
                (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                if not 8 < n <= MAX_FRAME:
                    raise ValueError(f"a frame of {n} bytes")
                body = await reader.readexactly(n)
                counter = int.from_bytes(body[:8], "little")
                if counter <= self.last.get(ring_id, 0):
                    raise ValueError("a replayed or reordered frame")
                raw = aead.decrypt(counter.to_bytes(12, "little"), body[8:], ring_id.encode())
                self.last[ring_id] = counter  # once it proved genuine
                batch, passes, released = decode_report(raw)
                if ring_id not in self.keys:
                    return  # the ring ended meanwhile
                self.received += 1
                self.on_report(ring_id, batch, passes, released)
        except asyncio.IncompleteReadError:
            pass  # the tail closed: the ring stopped
        except Exception as e:  # noqa: BLE001 - fail closed: this connection ends, the ring breaks on its next send
            self.refused += 1
            log.warning("ring report connection %s closed: %s", ring_id or "(no hello)", type(e).__name__)
        finally:
            if ring_id is not None and self.writers.get(ring_id) is writer:
                del self.writers[ring_id]
            writer.close()

    async def _hello(self, reader: asyncio.StreamReader, challenge: bytes) -> tuple[str, Any]:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        head = await reader.readexactly(len(MAGIC) + 2)
        (n,) = struct.unpack("<H", head[len(MAGIC):])
        if head[:len(MAGIC)] != MAGIC or n > MAX_RING_ID:
            raise ValueError("not a ring report hello")
        rid = await reader.readexactly(n)
        mac = await reader.readexactly(32)
        ring_id = rid.decode("utf-8", errors="replace")
        secret = self.keys.get(ring_id)
        if secret is None or not hmac.compare_digest(mac, _hello_mac(secret, rid, challenge)):
            raise ValueError("a hello without a known ring's secret")
        return ring_id, AESGCM(report_key(secret))
