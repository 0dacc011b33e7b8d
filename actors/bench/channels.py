"""`meshpipe bench channels`: ms per hop around a ring of actors, TCP channels (the decode rings') vs shared
memory with a socket wakeup vs gloo channels vs Ray-call channels vs a bare Ray call passing an ObjectRef,
in the same run.

Per (shape, actors): a ring of `ChannelPeer` actors (num_cpus=0). "tcp", "gloo" and "ray" set up a
`ChannelGroup` of that kind; actor 0 sends one message at a time around the ring (`ring_origin`) and
the others `relay_loop`, so a hop is one send + recv on a channel. "shm" is the one-node alternative
weighed against TCP (`ShmLink`): the message goes into a shared-memory segment of the sender's and
only its length through the TCP channel, which wakes the receiver. "ray_ref" is today's hop without a
router: the driver chains `echo` calls, each on the next actor, each taking the previous call's
ObjectRef. ms per hop = elapsed / (messages x actors) for the rings, elapsed / messages for ray_ref.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

from actors.channels import Channel, ChannelEndpoint, ChannelGroup, TcpChannel
from actors.wire.channel_frame import frame_descriptor, pack_message, unpack_message

log = logging.getLogger(__name__)

SIZES = ((1, 576), (64, 576), (1, 256 * 576))  # one token's activation, 64 tokens (147 KB), 590 KB
HEADER = b"\x00" * 48  # about a sealed envelope's header


_LEN = struct.Struct("<Q")


class ShmLink(Channel):
    """A TCP channel whose messages travel through shared memory: `send` writes the message into the
    sender's segment and sends its length, `recv` reads the length and copies the message out. One
    message in flight per direction (the bench's rings), so a segment is never written while read."""

    kind = "shm"

    def __init__(self, tcp: TcpChannel, out: shared_memory.SharedMemory | None,
                 into: shared_memory.SharedMemory | None) -> None:
        super().__init__(tcp.local, tcp.peer, tcp.timeout_s)
        self.tcp, self.out, self.into = tcp, out, into

    def send(self, header: bytes, tensor: torch.Tensor | None = None, timeout_s: float | None = None) -> None:
        buf, length = pack_message(header, tensor)
        if self.out is None or length > self.out.size:
            raise ValueError(f"a message of {length} bytes does not fit this link's segment")
        self.out.buf[:length] = buf[:length].numpy()
        self.tcp.send_bytes(_LEN.pack(length), timeout_s)

    def recv(self, timeout_s: float | None = None) -> tuple[bytes, torch.Tensor | None]:
        (length,) = _LEN.unpack(self.tcp.recv_bytes(timeout_s))
        if self.into is None or length > self.into.size:
            raise ValueError(f"a message of {length} bytes announced past this link's segment")
        frame = torch.frombuffer(bytearray(self.into.buf[:length]), dtype=torch.uint8)
        return unpack_message(frame_descriptor(frame), frame)


class ChannelPeer(ChannelEndpoint):
    """A test/bench actor: relays messages from its previous ring neighbour to its next one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._endpoint()

    def ring(self) -> tuple[Channel, Channel]:
        """(channel to receive from, channel to send to): the previous and next names in the ring."""
        return self.channels[self.prev_peer], self.channels[self.next_peer]

    def relay_loop(self, n: int, timeout_s: float | None = None) -> int:
        """Receive from prev, send to next, `n` times; the count relayed."""
        src, dst = self.ring()
        for _ in range(n):
            header, tensor = src.recv(timeout_s)
            dst.send(header, tensor)
        _flush(dst)
        return n

    def ring_origin(self, messages: list[tuple[bytes, torch.Tensor | None]],
                    timeout_s: float | None = None) -> tuple[list[tuple[bytes, torch.Tensor | None]], float]:
        """Send each message round the ring and wait for it back; (messages received, seconds)."""
        src, dst = self.ring()
        got = []
        t0 = time.perf_counter()
        for header, tensor in messages:
            dst.send(header, tensor)
            got.append(src.recv(timeout_s))
        elapsed = time.perf_counter() - t0
        return [(h, None if t is None else t.clone()) for h, t in got], elapsed

    def ring_origin_repeat(self, header: bytes, tensor: torch.Tensor, n: int,
                           timeout_s: float | None = None) -> float:
        """`ring_origin` of one message `n` times, after one warm-up lap; seconds for the `n`."""
        src, dst = self.ring()
        dst.send(header, tensor)
        src.recv(timeout_s)
        t0 = time.perf_counter()
        for _ in range(n):
            dst.send(header, tensor)
            src.recv(timeout_s)
        return time.perf_counter() - t0

    def shm_open(self, size: int) -> str:
        """A shared-memory segment for what this peer sends its next neighbour (after a "tcp" setup)."""
        self.shm_close()
        self.shm_out = shared_memory.SharedMemory(create=True, size=size)
        return self.shm_out.name

    def shm_attach(self, prev_segment: str) -> None:
        """Attaches the previous neighbour's segment and lets both ring links carry messages through them."""
        self.shm_in = shared_memory.SharedMemory(name=prev_segment)
        # its creator unlinks it: this process must not at exit (Python < 3.13 tracks attached segments too)
        resource_tracker.unregister(self.shm_in._name, "shared_memory")  # noqa: SLF001
        src, dst = self.ring()
        if src is dst:  # two peers: one channel both ways
            self.channels[self.prev_peer] = ShmLink(src, self.shm_out, self.shm_in)
        else:
            self.channels[self.prev_peer] = ShmLink(src, None, self.shm_in)
            self.channels[self.next_peer] = ShmLink(dst, self.shm_out, None)

    def shm_close(self) -> None:
        """Back to the plain TCP channels; this peer's segment is unlinked."""
        for k, ch in list(getattr(self, "channels", {}).items()):
            if isinstance(ch, ShmLink):
                self.channels[k] = ch.tcp
        for attr, owner in (("shm_in", False), ("shm_out", True)):
            seg = getattr(self, attr, None)
            if seg is not None:
                seg.close()
                if owner:
                    seg.unlink()
                setattr(self, attr, None)

    def ring_kinds(self) -> tuple[str, str]:
        """The kinds of (the channel received from, the channel sent to)."""
        src, dst = self.ring()
        return src.kind, dst.kind

    def recv_from(self, peer: str, timeout_s: float | None = None) -> tuple[bytes, Any]:
        """One receive from `peer` (tests: a killed peer must fail it)."""
        return self.channels[peer].recv(timeout_s)

    def pid(self) -> int:
        import os

        return os.getpid()

    def echo(self, x: Any) -> Any:
        return x


def _flush(ch: Channel) -> None:
    flush = getattr(ch, "flush", None)
    if flush is not None:
        flush()


def peer_class() -> Any:
    """`ChannelPeer` as a Ray actor class: no CPU reserved, threaded (Ray-call deliveries during recv)."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=4)(ChannelPeer)


def make_ring(n: int) -> list[Any]:
    cls = peer_class()
    return [cls.remote(f"peer-{i}") for i in range(n)]


def _ring_ms(actors: list[Any], kind: str, shape: tuple[int, ...], messages: int) -> tuple[str, float]:
    import ray

    group = ChannelGroup.setup(actors, kind="tcp" if kind == "shm" else kind)  # shm rides on tcp's setup
    shm = kind == "shm" and group.kind == "tcp"
    try:
        tensor = torch.randn(*shape)
        if shm:
            names = ray.get([a.shm_open.remote(pack_message(HEADER, tensor)[1]) for a in actors], timeout=60)
            ray.get([a.shm_attach.remote(names[i - 1]) for i, a in enumerate(actors)], timeout=60)
        relays = [a.relay_loop.remote(messages + 1) for a in actors[1:]]
        seconds = ray.get(actors[0].ring_origin_repeat.remote(HEADER, tensor, messages), timeout=300)
        ray.get(relays, timeout=60)
        return "shm" if shm else group.kind, 1e3 * seconds / (messages * len(actors))
    finally:
        if shm:
            ray.get([a.shm_close.remote() for a in actors], timeout=60)
        group.close()


def _ray_ref_ms(actors: list[Any], shape: tuple[int, ...], messages: int) -> float:
    import ray

    ref = ray.put(torch.randn(*shape))
    ray.get(actors[0].echo.remote(ref))
    t0 = time.perf_counter()
    for i in range(messages):
        ref = actors[i % len(actors)].echo.remote(ref)
    ray.get(ref)
    return 1e3 * (time.perf_counter() - t0) / messages


def bench_channels(sizes: Sequence[tuple[int, ...]] = SIZES, actors: Sequence[int] = (2, 4),
                   messages: int = 200) -> list[dict[str, Any]]:
    """One JSON-able row per (shape, actors, path): ms per hop; starts Ray if it is not running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
    rows = []
    try:
        for n in actors:
            ring = make_ring(n)
            ray.get([a.pid.remote() for a in ring])
            for shape in sizes:
                nbytes = 4 * int(torch.tensor(shape).prod())
                base = {"bench": "channels", "shape": list(shape), "bytes": nbytes, "actors": n,
                        "messages": messages}
                for kind in ("tcp", "shm", "gloo", "ray"):
                    got, ms = _ring_ms(ring, kind, shape, messages)
                    rows.append({**base, "path": got, "asked": kind, "ms_per_hop": ms})
                    log.info("%s", rows[-1])
                rows.append({**base, "path": "ray_ref", "asked": "ray_ref",
                             "ms_per_hop": _ray_ref_ms(ring, shape, messages)})
            for a in ring:
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    return rows
