"""`meshpipe bench channels`: ms per hop around a ring of actors, TCP channels (the decode rings') vs gloo
channels vs Ray-call channels vs a bare Ray call passing an ObjectRef, in the same run.

Per (shape, actors): a ring of `ChannelPeer` actors (num_cpus=0). "tcp", "gloo" and "ray" set up a
`ChannelGroup` of that kind; actor 0 sends one message at a time around the ring (`ring_origin`) and
the others `relay_loop`, so a hop is one send + recv on a channel. "ray_ref" is today's hop without a
router: the driver chains `echo` calls, each on the next actor, each taking the previous call's
ObjectRef. ms per hop = elapsed / (messages x actors) for the rings, elapsed / messages for ray_ref.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from actors.channels import Channel, ChannelEndpoint, ChannelGroup

log = logging.getLogger(__name__)

SIZES = ((1, 576), (64, 576), (1, 256 * 576))  # one token's activation, 64 tokens (147 KB), 590 KB
HEADER = b"\x00" * 48  # about a sealed envelope's header


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

    group = ChannelGroup.setup(actors, kind=kind)
    try:
        tensor = torch.randn(*shape)
        relays = [a.relay_loop.remote(messages + 1) for a in actors[1:]]
        seconds = ray.get(actors[0].ring_origin_repeat.remote(HEADER, tensor, messages), timeout=300)
        ray.get(relays, timeout=60)
        return group.kind, 1e3 * seconds / (messages * len(actors))
    finally:
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
                for kind in ("tcp", "gloo", "ray"):
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
