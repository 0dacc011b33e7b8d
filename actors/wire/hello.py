"""How a TCP link's connector proves it holds the link's secret without showing it (no Ray).

A link's hello is `MAGIC`, a fresh 32-byte nonce and an HMAC-SHA256, under a key derived from the
secret for this use alone, of the nonce and the link's direction ("a->b"). A listener accepts a hello
only for the direction it waits for, and each nonce once: a recorded hello neither opens another link
nor reveals the secret, and the secret's other uses (the ring's report key) stay out of reach.

`accept_hello` reads the hellos of every pending connection at once (selectors), so idle or slow
connections cannot keep the real peer waiting behind them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAGIC = b"MPR2"
NONCE_BYTES = 32
MAC_BYTES = 32
HELLO_BYTES = len(MAGIC) + NONCE_BYTES + MAC_BYTES
HELLO_WAIT_S = 5.0  # a connection that has not sent its whole hello by then is closed
MAX_PENDING = 16  # connections whose hello is still awaited; the oldest is closed beyond this


class HelloRefused(Exception):
    """A connection's hello was malformed, for another link, replayed or made without the secret."""


def link_key(secret: bytes) -> bytes:
    """The key of link hellos (another key than any other use of the secret)."""
    return hmac.new(secret, b"meshpipe link hello v2", hashlib.sha256).digest()


def _direction(src: str, dst: str) -> bytes:
    return src.encode() + b"\x00->\x00" + dst.encode()


def make_hello(secret: bytes, src: str, dst: str) -> bytes:
    """The hello `src` sends when it connects to `dst`'s listener."""
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + hmac.new(link_key(secret), nonce + _direction(src, dst), hashlib.sha256).digest()


def check_hello(hello: bytes, key: bytes, src: str, dst: str, seen: set[bytes]) -> None:
    """Raises HelloRefused unless `hello` is a fresh hello of the link src -> dst under `key` (`link_key`)."""
    if len(hello) != HELLO_BYTES or hello[:len(MAGIC)] != MAGIC:
        raise HelloRefused("not a link hello")
    nonce, mac = hello[len(MAGIC):len(MAGIC) + NONCE_BYTES], hello[len(MAGIC) + NONCE_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, nonce + _direction(src, dst), hashlib.sha256).digest()):
        raise HelloRefused("a hello without the link's secret, or for another link")
    if nonce in seen:
        raise HelloRefused("a replayed hello")
    seen.add(nonce)


@dataclass
class _Pending:
    since: float  # monotonic time of the accept
    got: bytearray = field(default_factory=bytearray)


def accept_hello(listener: socket.socket, secret: bytes, src: str, dst: str, deadline: float,
                 closed: Callable[[], bool], poll_s: float, seen: set[bytes]) -> socket.socket | None:
    """The first connection to `listener` whose hello is a fresh one of src -> dst, in blocking mode; None
    when `closed()` turns true or `deadline` (monotonic) passes. Other connections are closed unanswered."""
    key = link_key(secret)
    pending: dict[socket.socket, _Pending] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)

    def drop(conn: socket.socket) -> None:
        sel.unregister(conn)
        del pending[conn]
        conn.close()

    try:
        while not closed():
            now = time.monotonic()
            if now >= deadline:
                return None
            for conn in [c for c, p in pending.items() if now - p.since > HELLO_WAIT_S]:
                drop(conn)
            for ready, _ in sel.select(min(deadline - now, poll_s)):
                if ready.fileobj is listener:
                    try:
                        conn, _ = listener.accept()
                    except OSError:  # a closed listener (the loop's check ends it) or an aborted connection
                        continue
                    conn.setblocking(False)
                    if len(pending) >= MAX_PENDING:
                        drop(min(pending, key=lambda c: pending[c].since))
                    pending[conn] = _Pending(time.monotonic())
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = ready.fileobj  # type: ignore[assignment]
                p = pending[conn]
                try:
                    chunk = conn.recv(HELLO_BYTES - len(p.got))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    drop(conn)
                    continue
                if not chunk:
                    drop(conn)
                    continue
                p.got += chunk
                if len(p.got) < HELLO_BYTES:
                    continue
                try:
                    check_hello(bytes(p.got), key, src, dst, seen)
                except HelloRefused as e:
                    log.warning("link %s->%s: refused a connection: %s", src, dst, e)
                    drop(conn)
                    continue
                sel.unregister(conn)
                del pending[conn]
                conn.setblocking(True)
                return conn
        return None
    finally:
        for conn in list(pending):
            conn.close()
        sel.close()
