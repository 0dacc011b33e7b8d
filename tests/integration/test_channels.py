"""Channels between real Ray actors: a 3-actor ring under TCP, gloo and the Ray-call fallback (and the
bench's shared-memory links), a killed peer surfacing as ChannelError, and the fallback when gloo cannot
be set up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.bench.channels import make_ring
from actors.channels import ChannelError, ChannelGroup, ChannelTimeoutError

TIMEOUT_S = 10.0


def mixed_messages(n: int = 50) -> list[tuple[bytes, torch.Tensor | None]]:
    """Headers of every length (empty included) with tensors of several dtypes/shapes, 0-d and None."""
    gen = torch.Generator().manual_seed(0)
    makers = [
        lambda: torch.randn(1, 576, generator=gen),
        lambda: torch.randn(3, 4, 5, generator=gen, dtype=torch.float64),
        lambda: torch.randn(2, 7, generator=gen).to(torch.bfloat16),
        lambda: torch.randint(-10**12, 10**12, (9,), generator=gen, dtype=torch.int64),
        lambda: torch.tensor(2.5),
        lambda: None,
        lambda: torch.randn(64, 576, generator=gen),
        lambda: torch.zeros(0, 3),
    ]
    return [(bytes(range(i % 256))[: (i * 7) % 41], makers[i % len(makers)]()) for i in range(n)]


def same(a: tuple[bytes, torch.Tensor | None], b: tuple[bytes, torch.Tensor | None]) -> bool:
    if a[0] != b[0] or (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or (a[1].dtype == b[1].dtype and a[1].shape == b[1].shape and torch.equal(a[1], b[1]))


@pytest.fixture(scope="module")
def ring(ray_cluster: dict) -> Iterator[list[Any]]:
    """Three ChannelPeer actors, set up anew by each test that shares them."""
    import ray

    actors = make_ring(3)
    yield actors
    for a in actors:
        ray.kill(a)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "gloo", "ray"])
def test_ring_of_three_carries_mixed_messages_intact(ring: list[Any], kind: str) -> None:
    import ray

    group = ChannelGroup.setup(ring, kind=kind, timeout_s=TIMEOUT_S)
    try:
        assert group.kind == kind and group.fallback_reason is None
        assert group.links == [("peer-0", "peer-1"), ("peer-0", "peer-2"), ("peer-1", "peer-2")]
        messages = mixed_messages()
        assert any(h == b"" for h, _ in messages)
        relays = [a.relay_loop.remote(len(messages), TIMEOUT_S) for a in ring[1:]]
        got, _ = ray.get(ring[0].ring_origin.remote(messages, TIMEOUT_S), timeout=45)
        assert ray.get(relays, timeout=10) == [len(messages)] * 2
        assert len(got) == len(messages)
        assert [i for i, (a, b) in enumerate(zip(messages, got)) if not same(a, b)] == []
    finally:
        group.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("actors", [2, 3])
def test_the_benchs_shared_memory_links_carry_mixed_messages_intact_and_unlink_their_segments(
        ring: list[Any], actors: int) -> None:
    """`meshpipe bench channels`' "shm" path (weighed against TCP): messages through shared memory, their
    lengths over TCP; two peers share one channel both ways, three use one each way."""
    import ray

    peers = ring[:actors]
    group = ChannelGroup.setup(peers, kind="tcp", timeout_s=TIMEOUT_S)
    try:
        names = ray.get([a.shm_open.remote(1 << 20) for a in peers], timeout=30)
        ray.get([a.shm_attach.remote(names[i - 1]) for i, a in enumerate(peers)], timeout=30)
        assert all(Path("/dev/shm", n.lstrip("/")).exists() for n in names)
        assert ray.get([a.ring_kinds.remote() for a in peers]) == [("shm", "shm")] * actors
        messages = mixed_messages()
        relays = [a.relay_loop.remote(len(messages), TIMEOUT_S) for a in peers[1:]]
        got, _ = ray.get(peers[0].ring_origin.remote(messages, TIMEOUT_S), timeout=45)
        assert ray.get(relays, timeout=10) == [len(messages)] * (actors - 1)
        assert [i for i, (a, b) in enumerate(zip(messages, got)) if not same(a, b)] == []
        ray.get([a.shm_close.remote() for a in peers], timeout=30)
        assert ray.get([a.ring_kinds.remote() for a in peers]) == [("tcp", "tcp")] * actors  # back to TCP
        assert not any(Path("/dev/shm", n.lstrip("/")).exists() for n in names)  # unlinked
    finally:
        ray.get([a.shm_close.remote() for a in peers], timeout=30)
        group.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "gloo", "ray"])
def test_killed_peer_is_a_channel_error_within_the_timeout(ray_cluster: dict, kind: str) -> None:
    import ray

    ring = make_ring(2)
    group = ChannelGroup.setup(ring, kind=kind, timeout_s=TIMEOUT_S)
    try:
        pending = ring[0].recv_from.remote("peer-1", TIMEOUT_S)  # peer-0 waits on peer-1 ...
        time.sleep(0.5)
        ray.kill(ring[1])  # ... which dies
        started = time.monotonic()
        with pytest.raises(ChannelError) as caught:
            ray.get(pending, timeout=TIMEOUT_S + 10)
        assert time.monotonic() - started < TIMEOUT_S  # the death is seen, not the timeout
        assert not isinstance(caught.value, ChannelTimeoutError)
    finally:
        started = time.monotonic()
        group.close(timeout_s=10)  # teardown after a death does not hang
        assert time.monotonic() - started < 15
        for a in ring:
            ray.kill(a)


@pytest.mark.timeout(60)
def test_setup_falls_back_to_ray_when_gloo_cannot_start(ring: list[Any]) -> None:
    import ray

    group = ChannelGroup.setup(ring, kind="gloo", addr="203.0.113.1", timeout_s=3.0)  # TEST-NET: not ours
    try:
        assert group.kind == "ray" and "203.0.113.1" in (group.fallback_reason or "")
        messages = mixed_messages(6)
        relays = [a.relay_loop.remote(len(messages), TIMEOUT_S) for a in ring[1:]]
        got, _ = ray.get(ring[0].ring_origin.remote(messages, TIMEOUT_S), timeout=30)
        ray.get(relays, timeout=10)
        assert all(same(a, b) for a, b in zip(messages, got))
    finally:
        group.close()
