"""Point-to-point channels between pipeline actors: a bytes header plus an optional tensor per message.

A `Channel` joins this process to one named peer; `send(header, tensor)` and `recv() -> (header, tensor)`
block (no spinning). `GlooChannel`: torch.distributed gloo isend/irecv over TCP, one process group per
pipeline (a rank per actor); a message is a descriptor and a uint8 body (`actors.wire.channel_frame`: one
send when it fits in 4 KiB, two otherwise), so any dtype travels; CUDA tensors are copied to the CPU.
`RayCallChannel`: one Ray actor call per message (today's hop cost); a sequence number restores the
order threaded actors lose.

Failures are `ChannelError`s: a dead peer closes its TCP connections (gloo fails at once; a Ray-call
channel pings its peer while idle); waiting past a timeout is `ChannelTimeoutError`. A gloo timeout
closes the pair for good (a posted receive cannot be withdrawn): a channel that failed stays broken.
`ChannelGroup.setup(actors, kind)` wires a chain or ring of `ChannelEndpoint` actors, falling back from
"gloo" to "ray" (logged) when the group cannot form. Ray is imported only inside functions.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from actors.wire.channel_frame import (
    BODY_AT,
    FRAME_BYTES,
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    frame_descriptor,
    pack_message,
    unpack_message,
)
from actors.wire.hello import accept_hello, make_hello

log = logging.getLogger(__name__)

__all__ = ["ChannelClosedError", "ChannelEndpoint", "ChannelError", "ChannelGroup", "ChannelTimeoutError", "Channel", "GlooChannel",
           "Mailbox", "RayCallChannel", "TcpChannel", "TcpListener", "node_ip"]

FOREVER_S = 365 * 24 * 3600.0  # gloo needs a finite wait; a dead peer still fails at once (TCP close)
RAY_WINDOW = 8  # Ray deliveries in flight per channel before `send` waits for the oldest
PING_S = 1.0  # a Ray-call channel idle this long in recv asks whether its peer still lives
SETUP_CALL_S = 60.0  # Ray calls of a setup, on top of gloo's timeout (fresh actors may still be starting)


class Channel:
    """One peer, both directions: `send` a header and optional tensor, `recv` the next ones (blocking)."""

    kind = "abstract"

    def __init__(self, local: str, peer: str, timeout_s: float | None) -> None:
        self.local, self.peer, self.timeout_s = local, peer, timeout_s
        self.broken: str | None = None

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        raise NotImplementedError

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        raise NotImplementedError

    def _check(self) -> None:
        if self.broken:
            raise ChannelError(f"channel {self.local}<->{self.peer} is broken: {self.broken}")

    def _fail(self, what: str, e: BaseException, started: float, timeout_s: float) -> ChannelError:
        elapsed = time.monotonic() - started
        self.broken = f"{what}: {e}"
        timed_out = "Timed out" in str(e) or isinstance(e, TimeoutError)
        cls = ChannelTimeoutError if timed_out else ChannelClosedError if isinstance(e, ConnectionError) else ChannelError
        return cls(f"{self.kind} channel {self.local}<->{self.peer}: {what} failed after {elapsed:.2f} s "
                   f"(timeout {timeout_s:g} s): {e}")


class GlooChannel(Channel):
    """gloo point-to-point to `peer_rank` of the default process group (joined by `channel_setup_gloo`)."""

    kind = "gloo"

    def __init__(self, local: str, peer: str, peer_rank: int, timeout_s: float | None = None) -> None:
        super().__init__(local, peer, timeout_s)
        self.peer_rank = peer_rank

    def _wait(self, start: Callable[[], Any], what: str, timeout_s: float | None) -> None:
        """Start a gloo operation and wait for it; its errors as ChannelError."""
        limit = timeout_s if timeout_s is not None else self.timeout_s
        limit = FOREVER_S if limit is None else limit
        started = time.monotonic()
        try:
            start().wait(timeout=datetime.timedelta(seconds=limit))
        except RuntimeError as e:  # DistBackendError is one
            raise self._fail(what, e, started, limit) from e

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        import torch.distributed as dist

        self._check()
        buf, length = pack_message(header, tensor)
        for part in (buf[:FRAME_BYTES], buf[FRAME_BYTES:length]) if length > FRAME_BYTES else (buf,):
            self._wait(lambda t=part: dist.isend(t, dst=self.peer_rank), "send", timeout_s)

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        import torch.distributed as dist

        self._check()
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        self._wait(lambda: dist.irecv(frame, src=self.peer_rank), "recv", timeout_s)
        d = frame_descriptor(frame)
        if BODY_AT + d.body_len > FRAME_BYTES:
            buf = torch.empty(BODY_AT + d.body_len, dtype=torch.uint8)
            buf[:FRAME_BYTES] = frame
            self._wait(lambda: dist.irecv(buf[FRAME_BYTES:], src=self.peer_rank), "recv", timeout_s)
            frame = buf
        return unpack_message(d, frame)


TCP_SECRET_BYTES = 32  # a link's secret (`actors.wire.hello` proves it)
TCP_MAX_FRAME = 1 << 31  # a frame longer than this is refused before any buffer is allocated
_LEN = struct.Struct("<Q")
SMALL_FRAME = 64 << 10  # frames up to this are copied behind their length and sent at once
ACCEPT_POLL_S = 0.25  # a waiting accept looks this often whether its listener was closed meanwhile


def node_ip() -> str:
    """This node's IP as Ray sees it (the loopback outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


class TcpListener:
    """A listening TCP socket on this node; `accept` takes the next peer that proves the link's secret."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)  # idle connections must not fill the queue before the real peer
        self.host, self.port = host, self.sock.getsockname()[1]
        self.closed = False  # `close()` from another thread ends a waiting `accept` within ACCEPT_POLL_S
        self.seen: set[bytes] = set()  # hello nonces accepted here (a replayed hello is refused)

    def accept(self, secret: bytes, local: str, peer: str, timeout_s: float = 30.0) -> TcpChannel:
        """The first connection whose hello proves `secret` for the link peer -> local (`actors.wire.hello`:
        the secret never crosses the wire, a hello counts once); others are closed unanswered."""
        conn = accept_hello(self.sock, secret, peer, local, time.monotonic() + timeout_s, lambda: self.closed,
                            ACCEPT_POLL_S, self.seen)
        if conn is not None:
            return TcpChannel(local, peer, conn)
        if self.closed:
            raise ChannelError(f"tcp channel {local}<-{peer}: the listener closed while waiting for the peer")
        raise ChannelTimeoutError(f"tcp channel {local}<-{peer}: no peer connected within {timeout_s:g} s")

    def close(self) -> None:
        """Stops listening; an `accept` waiting in another thread raises ChannelError."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept at once (Linux)
        except OSError:
            pass
        self.sock.close()


def _recv_exact(sock: socket.socket, n: int, into: memoryview | None = None) -> memoryview:
    buf = memoryview(bytearray(n)) if into is None else into
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:], n - got)
        if k == 0:
            raise ChannelClosedError("the peer closed the connection")
        got += k
    return buf


class TcpChannel(Channel):
    """One TCP connection (TCP_NODELAY), length-prefixed frames; blocking reads, a closed peer fails at once.

    `send_bytes`/`recv_bytes` carry whole frames (a ring's sealed messages); `send`/`recv` carry a
    header and tensor like the other channels (`actors.wire.channel_frame`). Either end may use it,
    but one thread per direction.
    """

    kind = "tcp"

    def __init__(self, local: str, peer: str, sock: socket.socket, timeout_s: float | None = None) -> None:
        super().__init__(local, peer, timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.sock = sock

    @classmethod
    def connect(cls, local: str, peer: str, host: str, port: int, secret: bytes, timeout_s: float = 30.0
                ) -> TcpChannel:
        """Connects to a `TcpListener` and proves the link's secret (without sending it)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            sock.sendall(make_hello(secret, local, peer))
        except OSError as e:
            raise ChannelError(f"tcp channel {local}->{peer}: cannot connect: {e}") from None
        return cls(local, peer, sock)

    def send_bytes(self, data: Any, timeout_s: float | None = None) -> None:
        self._check()
        view = memoryview(data).cast("B")
        started = time.monotonic()
        try:
            if view.nbytes <= SMALL_FRAME:  # one segment: length and body in one syscall
                self.sock.sendall(_LEN.pack(view.nbytes) + view.tobytes())
            else:
                self.sock.sendall(_LEN.pack(view.nbytes))
                self.sock.sendall(view)
        except OSError as e:
            raise self._fail("send", e, started, timeout_s or 0) from e

    def recv_bytes(self, timeout_s: float | None = None) -> memoryview:
        """The next frame (a writable buffer of its own)."""
        self._check()
        limit = timeout_s if timeout_s is not None else self.timeout_s
        started = time.monotonic()
        try:
            self.sock.settimeout(limit)
            (n,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size))
            if n > TCP_MAX_FRAME:
                raise ChannelError(f"a frame of {n} bytes is over the limit of {TCP_MAX_FRAME}")
            return _recv_exact(self.sock, n)
        except (OSError, ChannelError) as e:
            raise self._fail("recv", e, started, limit or 0) from e

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        buf, length = pack_message(header, tensor)
        self.send_bytes(buf[:length].numpy(), timeout_s)

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        frame = torch.frombuffer(self.recv_bytes(timeout_s), dtype=torch.uint8)
        return unpack_message(frame_descriptor(frame), frame)

    def close(self) -> None:
        self.broken = self.broken or "closed"
        close_socket(self.sock)


def close_socket(sock: socket.socket) -> None:
    """Shuts a connected socket down both ways (a peer blocked reading it wakes at once), then closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Mailbox:
    """Messages delivered by Ray calls, per sender, released in sequence order (blocking `get`).

    `epoch` names the setup the mailbox belongs to: deliveries of an earlier setup are dropped.
    """

    def __init__(self, epoch: str = "") -> None:
        self.epoch = epoch
        self._cond = threading.Condition()
        self._pending: dict[str, dict[int, tuple[bytes, torch.Tensor | None]]] = {}
        self._next: dict[str, int] = {}

    def put(self, src: str, seq: int, header: bytes, tensor: torch.Tensor | None) -> None:
        with self._cond:
            self._pending.setdefault(src, {})[seq] = (header, tensor)
            self._cond.notify_all()

    def get(self, src: str, timeout_s: float | None) -> tuple[bytes, torch.Tensor | None]:
        """The next message from `src`; ChannelTimeoutError after `timeout_s` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                seq = self._next.get(src, 0)
                msg = self._pending.get(src, {}).pop(seq, None)
                if msg is not None:
                    self._next[src] = seq + 1
                    return msg
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ChannelTimeoutError(f"no message from {src} within {timeout_s:g} s")
                self._cond.wait(left)


class RayCallChannel(Channel):
    """One Ray actor call per message to the peer's `channel_deliver`; receives from this actor's Mailbox."""

    kind = "ray"

    def __init__(self, local: str, peer: str, handle: Any, mailbox: Mailbox, timeout_s: float | None = None,
                 window: int = RAY_WINDOW) -> None:
        super().__init__(local, peer, timeout_s)
        self.handle, self.mailbox, self.window = handle, mailbox, window
        self._seq = 0
        self._inflight: deque[Any] = deque()

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        self._check()
        self._inflight.append(self.handle.channel_deliver.remote(self.local, self.mailbox.epoch, self._seq,
                                                                  header, tensor))
        self._seq += 1
        self.flush(timeout_s, keep=self.window)

    def flush(self, timeout_s: float | None = None, keep: int = 0) -> None:
        """Wait until at most `keep` sent messages are not yet in the peer's mailbox."""
        import ray

        limit = timeout_s if timeout_s is not None else self.timeout_s
        while len(self._inflight) > keep:
            started = time.monotonic()
            try:
                ray.get(self._inflight.popleft(), timeout=limit)
            except (ray.exceptions.RayError, TimeoutError) as e:
                raise self._fail("send", e, started, limit or 0) from e

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        """The peer's next message; every `PING_S` idle, a call to the peer checks it is alive."""
        import ray

        self._check()
        limit = timeout_s if timeout_s is not None else self.timeout_s
        started = time.monotonic()
        while True:
            left = None if limit is None else limit - (time.monotonic() - started)
            try:
                return self.mailbox.get(self.peer, PING_S if left is None else max(0.0, min(PING_S, left)))
            except ChannelTimeoutError as e:
                if left is not None and left <= PING_S:
                    raise self._fail("recv", e, started, limit or 0) from e
            try:
                ray.get(self.handle.channel_ping.remote(), timeout=PING_S)
            except ray.exceptions.GetTimeoutError:
                pass  # alive but busy: keep waiting
            except ray.exceptions.RayError as e:
                raise self._fail("recv", e, started, limit or 0) from e


class ChannelEndpoint:
    """Mix into an actor class: its channels by peer name, set up by `ChannelGroup.setup`.

    The actor needs max_concurrency >= 2 for the "ray" kind (deliveries arrive while it blocks in recv).
    """

    def _endpoint(self) -> None:
        if not hasattr(self, "channels"):
            self.channels: dict[str, Channel] = {}
            self.mailbox = Mailbox()
            self.gloo_ready = False
            self.listeners: dict[str, TcpListener] = {}  # "tcp" setup: peers still to accept
            self.prev_peer: str | None = None  # the chain/ring neighbours ChannelGroup.setup named
            self.next_peer: str | None = None

    def channel_free_port(self, host: str) -> int:
        """A TCP port free on `host` now (the OS picks it)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def channel_setup_gloo(self, name: str, rank: int, world: int, addr: str, port: int,
                           peers: dict[str, int], timeout_s: float,
                           prev_next: tuple[str | None, str | None]) -> str:
        """Join the pipeline's gloo group as `rank` and open a `GlooChannel` to each peer name -> rank."""
        import torch.distributed as dist

        self._endpoint()
        self.channel_close()
        self.prev_peer, self.next_peer = prev_next
        if addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.gloo_ready = True
        self.channels = {p: GlooChannel(name, p, r, timeout_s=None) for p, r in peers.items()}
        return name

    def channel_tcp_listen(self, peers: list[str]) -> dict[str, tuple[str, int]]:
        """A listener for each peer that will connect here: peer name -> (host, port)."""
        self._endpoint()
        self.channel_close()
        self.listeners = {p: TcpListener(node_ip()) for p in peers}
        return {p: (lst.host, lst.port) for p, lst in self.listeners.items()}

    def channel_setup_tcp(self, name: str, connect: dict[str, tuple[str, int]], secret: bytes,
                          timeout_s: float, prev_next: tuple[str | None, str | None]) -> str:
        """Connect to the peers in `connect`, accept the ones `channel_tcp_listen` waits for."""
        self.prev_peer, self.next_peer = prev_next
        channels: dict[str, Channel] = {}
        try:
            for p, (host, port) in connect.items():
                channels[p] = TcpChannel.connect(name, p, host, port, secret=secret, timeout_s=timeout_s)
            for p, lst in self.listeners.items():
                channels[p] = lst.accept(secret, name, p, timeout_s)
        finally:
            for lst in self.listeners.values():
                lst.close()
            self.listeners = {}
        self.channels = channels
        return name

    def channel_setup_ray(self, name: str, peers: dict[str, Any], timeout_s: float | None,
                          prev_next: tuple[str | None, str | None], epoch: str) -> str:
        """Open a `RayCallChannel` to each peer name -> actor handle; `epoch` names this setup."""
        self._endpoint()
        self.channel_close()
        self.prev_peer, self.next_peer = prev_next
        self.mailbox = Mailbox(epoch)
        self.channels = {p: RayCallChannel(name, p, h, self.mailbox, timeout_s) for p, h in peers.items()}
        return name

    def channel_deliver(self, src: str, epoch: str, seq: int, header: bytes,
                        tensor: torch.Tensor | None) -> None:
        """A `RayCallChannel.send` arriving (dropped if it belongs to an earlier setup)."""
        self._endpoint()
        if epoch == self.mailbox.epoch:
            self.mailbox.put(src, seq, header, tensor)
        else:
            log.debug("dropped a message from %s of setup %s (now %s)", src, epoch, self.mailbox.epoch)

    def channel_ping(self) -> bool:
        return True

    def channel_close(self) -> None:
        """Close the channels and leave the gloo group (if joined); never hangs on a dead peer."""
        self._endpoint()
        for ch in self.channels.values():
            if isinstance(ch, TcpChannel):
                ch.close()
        self.channels = {}
        if self.gloo_ready:
            import torch.distributed as dist

            self.gloo_ready = False
            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass
class ChannelGroup:
    """A chain or ring of `ChannelEndpoint` actors, wired by `setup`; `kind` is what was set up."""

    actors: list[Any]
    names: list[str]
    kind: str
    ring: bool = True
    fallback_reason: str | None = None

    def prev_next(self, i: int) -> tuple[str | None, str | None]:
        """Actor i's (previous, next) neighbour names (None at a chain's ends)."""
        n = len(self.actors)
        prev = self.names[(i - 1) % n] if self.ring or i > 0 else None
        return prev, (self.names[(i + 1) % n] if self.ring or i < n - 1 else None)

    def peers(self, i: int) -> dict[str, int]:
        """Actor i's neighbours: name -> index (rank)."""
        return {p: self.names.index(p) for p in self.prev_next(i) if p is not None}

    @property
    def links(self) -> list[tuple[str, str]]:
        """Every channel once, as (lower-ranked name, higher-ranked name)."""
        return sorted({tuple(sorted((self.names[i], p), key=self.names.index))
                       for i in range(len(self.actors)) for p in self.peers(i)})

    @classmethod
    def setup(cls, actors: list[Any], kind: str = "gloo", names: list[str] | None = None, ring: bool = True,
              addr: str = "127.0.0.1", timeout_s: float = 30.0) -> ChannelGroup:
        """Give actor i channels to i-1 and i+1 (wrapping round when `ring`); "gloo" and "tcp" fall back
        to "ray" (logged) when they cannot form."""
        if kind not in ("gloo", "tcp", "ray") or len(actors) < 2:
            raise ValueError(f"kind {kind!r} for {len(actors)} actors: choose gloo, tcp or ray, 2 actors or more")
        group = cls(list(actors), names or [f"peer-{i}" for i in range(len(actors))], kind, ring)
        if kind != "ray":
            reason = group._setup_gloo(addr, timeout_s) if kind == "gloo" else group._setup_tcp(timeout_s)
            if reason is None:
                return group
            log.warning("%s channels unavailable, falling back to Ray calls: %s", kind, reason)
            group.kind, group.fallback_reason = "ray", reason
        import uuid

        import ray

        epoch = uuid.uuid4().hex  # this setup's name: Ray deliveries of an earlier one are dropped
        ray.get([a.channel_setup_ray.remote(group.names[i], {p: actors[j] for p, j in group.peers(i).items()},
                                            timeout_s, group.prev_next(i), epoch)
                 for i, a in enumerate(actors)], timeout=SETUP_CALL_S)
        return group

    def _setup_gloo(self, addr: str, timeout_s: float) -> str | None:
        """None when every actor joined the group, else why not (and every actor left it again)."""
        import ray

        try:
            port = ray.get(self.actors[0].channel_free_port.remote(addr), timeout=SETUP_CALL_S)
        except Exception as e:  # noqa: BLE001 - any failure means: no gloo
            return f"no free port on {addr}: {type(e).__name__}: {e}"
        refs = [a.channel_setup_gloo.remote(self.names[i], i, len(self.actors), addr, port, self.peers(i),
                                            timeout_s, self.prev_next(i)) for i, a in enumerate(self.actors)]
        errors = []
        for name, ref in zip(self.names, refs):
            try:
                ray.get(ref, timeout=timeout_s + SETUP_CALL_S)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
        if not errors:
            return None
        ray.get([a.channel_close.remote() for a in self.actors], timeout=SETUP_CALL_S)
        return f"gloo at {addr}:{port}: " + "; ".join(errors)

    def _setup_tcp(self, timeout_s: float) -> str | None:
        """None when every link connected (the lower-ranked end connects), else why not."""
        import secrets

        import ray

        secret = secrets.token_bytes(TCP_SECRET_BYTES)
        try:
            waits = {n: [a for a, b in self.links if b == n] for n in self.names}
            at = dict(zip(self.names, ray.get([a.channel_tcp_listen.remote(waits[n])
                                               for a, n in zip(self.actors, self.names)], timeout=SETUP_CALL_S)))
            ray.get([a.channel_setup_tcp.remote(n, {b: at[b][n] for a_, b in self.links if a_ == n}, secret,
                                                timeout_s, self.prev_next(i))
                     for i, (a, n) in enumerate(zip(self.actors, self.names))], timeout=timeout_s + SETUP_CALL_S)
            return None
        except Exception as e:  # noqa: BLE001 - any failure means: no tcp
            self.close()
            return f"tcp: {type(e).__name__}: {str(e).splitlines()[-1][:300]}"

    def close(self, timeout_s: float = 10.0) -> None:
        """Every live actor leaves its channels (dead ones are skipped)."""
        import ray

        for a in self.actors:
            try:
                ray.get(a.channel_close.remote(), timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - a dead actor has nothing to close
                log.debug("channel_close on %s: %s", a, e)
