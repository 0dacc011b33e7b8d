"""Point-to-point channels between pipeline actors: a bytes header plus an optional tensor per message.

A `Channel` joins this process to one named peer; `send(header, tensor)` and `recv() -> (header, tensor)`
block (no spinning). Two implementations, one interface:

- `GlooChannel`: torch.distributed gloo `isend`/`irecv` over TCP, in one process group per pipeline
  (one rank per actor). A message is a fixed-size int64 descriptor (`encode_descriptor`: header length,
  dtype, shape), then one uint8 body: the header, padding to `ALIGN`, the tensor's bytes. Any dtype
  travels as bytes, so gloo's dtype support does not matter; CUDA tensors are copied to the CPU.
- `RayCallChannel`: one Ray actor call per message (`ChannelEndpoint.channel_deliver`), the path today's
  hops pay; a sequence number restores order on the receiving side (threaded actors reorder calls).

Failures surface as `ChannelError`: a peer process dying closes its TCP connections, so a pending gloo
receive fails at once; a receive that waits past its timeout raises `ChannelTimeoutError`. A gloo timeout
closes the pair for good (gloo cannot withdraw a posted receive), so a channel that failed once stays broken.

`ChannelGroup.setup(actors, kind)` wires a chain or ring of actors that mix in `ChannelEndpoint` and falls
back from "gloo" to "ray" (logging why) when the process group cannot be formed. Ray is imported only
inside functions.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from models.errors import MeshpipeError

log = logging.getLogger(__name__)

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
MAX_DIMS = 8
DESCRIPTOR_LEN = 3 + MAX_DIMS  # header length, dtype code (-1: no tensor), ndim, dims
ALIGN = 16  # the tensor's bytes start at a multiple of this in the body, so `view(dtype)` is legal
NO_TENSOR = -1
FOREVER_S = 365 * 24 * 3600.0  # gloo needs a finite wait; a dead peer still fails at once (TCP close)
RAY_WINDOW = 8  # Ray deliveries in flight per channel before `send` waits for the oldest
PING_S = 1.0  # a Ray-call channel idle this long in recv asks whether its peer still lives
SETUP_CALL_S = 60.0  # Ray calls of a setup, on top of gloo's timeout (fresh actors may still be starting)


class ChannelError(MeshpipeError, RuntimeError):
    """A channel failed: the peer died, the connection closed, or the message was malformed."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """No message (or no send completion) within the timeout; the channel is broken afterwards."""


# --------------------------------------------------------------------------- descriptor


@dataclass(frozen=True)
class Descriptor:
    """What precedes a message body: header length, tensor dtype (None: no tensor) and shape."""

    header_len: int
    dtype: torch.dtype | None
    shape: tuple[int, ...]

    @property
    def offset(self) -> int:
        """Where the tensor's bytes start in the body (the header padded to `ALIGN`)."""
        return -(-self.header_len // ALIGN) * ALIGN if self.dtype is not None else self.header_len

    @property
    def nbytes(self) -> int:
        """The tensor's bytes (0 without a tensor)."""
        if self.dtype is None:
            return 0
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def body_len(self) -> int:
        return self.offset + self.nbytes if self.dtype is not None else self.header_len


def encode_descriptor(header_len: int, tensor: torch.Tensor | None) -> torch.Tensor:
    """The int64 descriptor of a message (length `DESCRIPTOR_LEN`)."""
    desc = torch.zeros(DESCRIPTOR_LEN, dtype=torch.int64)
    desc[0] = header_len
    if tensor is None:
        desc[1] = NO_TENSOR
        return desc
    if tensor.dtype not in DTYPE_CODE:
        raise ChannelError(f"dtype {tensor.dtype} cannot travel on a channel (known: {list(DTYPES)})")
    if tensor.dim() > MAX_DIMS:
        raise ChannelError(f"a {tensor.dim()}-d tensor: channels carry at most {MAX_DIMS} dims")
    desc[1] = DTYPE_CODE[tensor.dtype]
    desc[2] = tensor.dim()
    desc[3:3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return desc


def decode_descriptor(desc: torch.Tensor) -> Descriptor:
    """The `Descriptor` an `encode_descriptor` tensor carries; ChannelError if it is malformed."""
    values = desc.tolist()
    if len(values) != DESCRIPTOR_LEN:
        raise ChannelError(f"descriptor of {len(values)} values, expected {DESCRIPTOR_LEN}")
    header_len, code, ndim = values[:3]
    if header_len < 0 or not (code == NO_TENSOR or 0 <= code < len(DTYPES)) or not 0 <= ndim <= MAX_DIMS:
        raise ChannelError(f"malformed descriptor {values}")
    if code == NO_TENSOR:
        return Descriptor(header_len, None, ())
    shape = tuple(values[3:3 + ndim])
    if any(d < 0 for d in shape):
        raise ChannelError(f"malformed descriptor {values}")
    return Descriptor(header_len, DTYPES[code], shape)


def pack_body(header: bytes, tensor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(descriptor, uint8 body) of a message."""
    desc = encode_descriptor(len(header), tensor)
    d = decode_descriptor(desc)
    body = torch.empty(d.body_len, dtype=torch.uint8)
    if header:
        body[:len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    if tensor is not None and d.nbytes:
        body[d.offset:] = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return desc, body


def unpack_body(d: Descriptor, body: torch.Tensor) -> tuple[bytes, torch.Tensor | None]:
    """(header, tensor) from a body; the tensor is a view of the body (no copy)."""
    header = body[:d.header_len].numpy().tobytes()
    if d.dtype is None:
        return header, None
    return header, body[d.offset:d.offset + d.nbytes].view(d.dtype).reshape(d.shape)


# --------------------------------------------------------------------------- channels


class Channel:
    """One peer, both directions: `send` a header and optional tensor, `recv` the next ones (blocking)."""

    kind = "abstract"

    def __init__(self, local: str, peer: str, timeout_s: float | None) -> None:
        self.local, self.peer, self.timeout_s = local, peer, timeout_s
        self.broken: str | None = None

    def send(self, header: bytes, tensor: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the channel holds (the group's teardown is `ChannelEndpoint.channel_close`)."""

    def _check(self) -> None:
        if self.broken:
            raise ChannelError(f"channel {self.local}<->{self.peer} is broken: {self.broken}")

    def _fail(self, what: str, e: BaseException, started: float, timeout_s: float) -> ChannelError:
        elapsed = time.monotonic() - started
        self.broken = f"{what}: {e}"
        timed_out = "Timed out" in str(e) or isinstance(e, TimeoutError)
        cls = ChannelTimeoutError if timed_out else ChannelError
        return cls(f"{self.kind} channel {self.local}<->{self.peer}: {what} failed after {elapsed:.2f} s "
                   f"(timeout {timeout_s:g} s): {e}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.local!r} <-> {self.peer!r})"


class GlooChannel(Channel):
    """gloo point-to-point to `peer_rank` of the default process group (`ChannelEndpoint.channel_setup_gloo`)."""

    kind = "gloo"

    def __init__(self, local: str, peer: str, peer_rank: int, timeout_s: float | None = None) -> None:
        super().__init__(local, peer, timeout_s)
        self.peer_rank = peer_rank

    def _wait(self, work: Any, what: str, timeout_s: float | None) -> None:
        limit = timeout_s if timeout_s is not None else self.timeout_s
        limit = FOREVER_S if limit is None else limit
        started = time.monotonic()
        try:
            work.wait(timeout=datetime.timedelta(seconds=limit))
        except RuntimeError as e:  # DistBackendError is one
            raise self._fail(what, e, started, limit) from e

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        import torch.distributed as dist

        self._check()
        desc, body = pack_body(header, tensor)
        try:
            works = [dist.isend(desc, dst=self.peer_rank)]
            if body.numel():
                works.append(dist.isend(body, dst=self.peer_rank))
        except RuntimeError as e:
            raise self._fail("send", e, time.monotonic(), 0) from e
        for w in works:
            self._wait(w, "send", timeout_s)

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        import torch.distributed as dist

        self._check()
        desc = torch.empty(DESCRIPTOR_LEN, dtype=torch.int64)
        try:
            work = dist.irecv(desc, src=self.peer_rank)
        except RuntimeError as e:
            raise self._fail("recv", e, time.monotonic(), 0) from e
        self._wait(work, "recv", timeout_s)
        d = decode_descriptor(desc)
        body = torch.empty(d.body_len, dtype=torch.uint8)
        if d.body_len:
            self._wait(dist.irecv(body, src=self.peer_rank), "recv", timeout_s)
        return unpack_body(d, body)


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
    """One Ray actor call per message to the peer's `channel_deliver`; receives from this actor's `Mailbox`."""

    kind = "ray"

    def __init__(self, local: str, peer: str, handle: Any, mailbox: Mailbox, timeout_s: float | None = None,
                 window: int = RAY_WINDOW) -> None:
        super().__init__(local, peer, timeout_s)
        self.handle, self.mailbox, self.window = handle, mailbox, window
        self._seq = 0
        self._inflight: deque[Any] = deque()

    def _settle(self, ref: Any, timeout_s: float | None) -> None:
        import ray

        limit = timeout_s if timeout_s is not None else self.timeout_s
        started = time.monotonic()
        try:
            ray.get(ref, timeout=limit)
        except (ray.exceptions.RayError, TimeoutError) as e:
            raise self._fail("send", e, started, limit or 0) from e

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        self._check()
        self._inflight.append(self.handle.channel_deliver.remote(self.local, self.mailbox.epoch, self._seq,
                                                                  header, tensor))
        self._seq += 1
        while len(self._inflight) > self.window:
            self._settle(self._inflight.popleft(), timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every sent message reached the peer's mailbox."""
        while self._inflight:
            self._settle(self._inflight.popleft(), timeout_s)

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


# --------------------------------------------------------------------------- endpoints and groups


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ChannelEndpoint:
    """Mix into an actor class: its channels by peer name, set up by `ChannelGroup.setup`.

    The actor needs max_concurrency >= 2 for the "ray" kind (deliveries arrive while it blocks in recv).
    """

    def _endpoint(self) -> None:
        if not hasattr(self, "channels"):
            self.channels: dict[str, Channel] = {}
            self.mailbox = Mailbox()
            self.gloo_ready = False
            self.prev_peer: str | None = None  # the chain/ring neighbours ChannelGroup.setup named
            self.next_peer: str | None = None

    def channel_free_port(self, host: str) -> int:
        return free_port(host)

    def channel_setup_gloo(self, name: str, rank: int, world: int, addr: str, port: int,
                           peers: dict[str, int], timeout_s: float, prev_next: tuple[str | None, str | None]) -> str:
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

    def channel_setup_ray(self, name: str, peers: dict[str, Any], timeout_s: float | None,
                          prev_next: tuple[str | None, str | None], epoch: str) -> str:
        """Open a `RayCallChannel` to each peer name -> actor handle; `epoch` names this setup."""
        self._endpoint()
        self.channel_close()
        self.prev_peer, self.next_peer = prev_next
        self.mailbox = Mailbox(epoch)
        self.channels = {p: RayCallChannel(name, p, h, self.mailbox, timeout_s) for p, h in peers.items()}
        return name

    def channel_deliver(self, src: str, epoch: str, seq: int, header: bytes, tensor: torch.Tensor | None) -> None:
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
    fallback_reason: str | None = None
    links: list[tuple[str, str]] = field(default_factory=list)
    ring: bool = True

    def prev_next(self, i: int) -> tuple[str | None, str | None]:
        """Actor i's (previous, next) neighbour names (None at a chain's ends)."""
        n = len(self.actors)
        prev = self.names[(i - 1) % n] if self.ring or i > 0 else None
        return prev, (self.names[(i + 1) % n] if self.ring or i < n - 1 else None)

    @classmethod
    def setup(cls, actors: list[Any], kind: str = "gloo", names: list[str] | None = None, ring: bool = True,
              addr: str = "127.0.0.1", timeout_s: float = 30.0) -> ChannelGroup:
        """Give actor i channels to i-1 and i+1 (wrapping round when `ring`); "gloo" falls back to "ray"."""
        if kind not in ("gloo", "ray"):
            raise ValueError(f"kind {kind!r}: choose gloo or ray")
        if len(actors) < 2:
            raise ValueError("a channel group needs at least 2 actors")
        names = names or [f"peer-{i}" for i in range(len(actors))]
        n = len(actors)
        neighbours = [sorted({(i + d) % n for d in (-1, 1) if ring or 0 <= i + d < n} - {i}) for i in range(n)]
        links = [(names[i], names[j]) for i in range(n) for j in neighbours[i] if i < j]
        group = cls(list(actors), names, kind, None, links, ring)
        if kind == "gloo":
            reason = group._setup_gloo(neighbours, addr, timeout_s)
            if reason is None:
                return group
            log.warning("gloo channels unavailable, falling back to Ray calls: %s", reason)
            group.kind, group.fallback_reason = "ray", reason
        group._setup_ray(neighbours, timeout_s)
        return group

    def _setup_gloo(self, neighbours: list[list[int]], addr: str, timeout_s: float) -> str | None:
        """None when every actor joined the group, else why not (and every actor left it again)."""
        import ray

        try:
            port = ray.get(self.actors[0].channel_free_port.remote(addr), timeout=SETUP_CALL_S)
        except Exception as e:  # noqa: BLE001 - any failure means: no gloo
            return f"no free port on {addr}: {type(e).__name__}: {e}"
        refs = [a.channel_setup_gloo.remote(self.names[i], i, len(self.actors), addr, port,
                                            {self.names[j]: j for j in neighbours[i]}, timeout_s,
                                            self.prev_next(i))
                for i, a in enumerate(self.actors)]
        errors = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=timeout_s + SETUP_CALL_S)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{self.names[i]}: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
        if not errors:
            return None
        ray.get([a.channel_close.remote() for a in self.actors], timeout=SETUP_CALL_S)
        return f"gloo at {addr}:{port}: " + "; ".join(errors)

    def _setup_ray(self, neighbours: list[list[int]], timeout_s: float) -> None:
        import uuid

        import ray

        epoch = uuid.uuid4().hex

        ray.get([a.channel_setup_ray.remote(self.names[i], {self.names[j]: self.actors[j] for j in neighbours[i]},
                                            timeout_s, self.prev_next(i), epoch)
                 for i, a in enumerate(self.actors)], timeout=SETUP_CALL_S)

    def close(self, timeout_s: float = 10.0) -> None:
        """Every live actor leaves its channels (dead ones are skipped)."""
        import ray

        for a in self.actors:
            try:
                ray.get(a.channel_close.remote(), timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - a dead actor has nothing to close
                log.debug("channel_close on %s: %s", a, e)
