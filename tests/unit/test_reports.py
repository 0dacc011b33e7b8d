"""A ring tail's token reports to the router over a socket (`actors.reports`), without Ray: reports arrive
in order and intact; a wrong secret, an unknown ring, a hello for another challenge, a second connection, a
replayed, tampered or oversized frame is refused and ends the connection; nothing refused reaches the router."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from actors.reports import (
    CHALLENGE_BYTES,
    MAX_FRAME,
    ReportSender,
    ReportServer,
    decode_report,
    encode_report,
    hello_of,
)
from models import TokenLogprob

SECRET = b"r" * 32
BATCH = [("req-1", [5, 6], [TokenLogprob(5, -0.25, {5: -0.25, 9: -2.0}), TokenLogprob(6, -1.5, {})], 1, 1, 3),
         ("req-2", [7], [None], 0, 0, 0)]
PASSES = [(6, [[0, 0, 0.1, 0.5, 0], [1, 0, 0.2, 0.4, 1]]),  # (input tokens, trace) per pass since the last report
          (2, [[0, 0, 0.3, 0.2, 0], [1, 0, 0.1, 0.3, 0]]),
          (0, [[0, 0, 0.0, 0.0, 2], [1, 0, 0.0, 0.0, 0]])]  # a release-only message, resent twice
RELEASED = ["req-0", "req-9"]  # sequences whose caches the ring freed since the last report


def run(body: Callable[[ReportServer, list, tuple[str, int]], Awaitable[None]]) -> list:
    """Runs `body(server, got, address)` on an event loop with a server for ring "ring-a"; what it got."""
    got: list = []

    async def main() -> None:
        server = ReportServer(lambda ring, batch, passes, released: got.append((ring, batch, passes, released)), "127.0.0.1")
        server.allow("ring-a", SECRET)
        addr = await server.address()
        try:
            await body(server, got, addr)
        finally:
            server.close()

    asyncio.run(main())
    return got


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_reports_arrive_in_order_with_their_logprobs() -> None:
    async def body(server: ReportServer, got: list, addr: tuple[str, int]) -> None:
        sender = await asyncio.to_thread(ReportSender, *addr, "ring-a", SECRET)
        for i in range(50):
            await asyncio.to_thread(sender.send, [(f"r{i}", [i], [None], 0, 0, i)], PASSES, [])
        sender.send(BATCH, PASSES, RELEASED)
        await until(lambda: len(got) == 51)
        sender.close()

    got = run(body)
    assert [b[0][0] for _, b, _, _ in got[:50]] == [f"r{i}" for i in range(50)]
    assert got[-1] == ("ring-a", BATCH, PASSES, RELEASED)


def raw_client(addr: tuple[str, int], hello: Callable[[bytes], bytes]) -> socket.socket:
    """A connection that answers the router's challenge with `hello(challenge)`."""
    s = socket.create_connection(addr)
    s.settimeout(5)
    challenge = b""
    while len(challenge) < CHALLENGE_BYTES:
        challenge += s.recv(CHALLENGE_BYTES - len(challenge))
    s.sendall(hello(challenge))
    return s


def closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("hello", [lambda c: hello_of("ring-a", b"x" * 32, c),  # a wrong secret
                                   lambda c: hello_of("ring-b", SECRET, c),  # a ring it does not know
                                   lambda c: hello_of("ring-a", SECRET, bytes(32)),  # made for another challenge
                                   lambda c: b"GET / HTTP/1.1\r\n\r\n"])
def test_a_hello_without_a_known_rings_secret_is_refused(hello: Callable[[bytes], bytes]) -> None:
    async def body(server: ReportServer, got: list, addr: tuple[str, int]) -> None:
        s = await asyncio.to_thread(raw_client, addr, hello)
        assert await asyncio.to_thread(closed, s)
        assert server.refused == 1
        s.close()

    assert run(body) == []


def test_replayed_tampered_and_oversized_frames_and_a_second_connection_are_refused() -> None:
    """Frames of a ring count up across its connections: a replay on a new connection is refused too."""
    def good(challenge: bytes) -> bytes:
        return hello_of("ring-a", SECRET, challenge)

    async def body(server: ReportServer, got: list, addr: tuple[str, int]) -> None:
        sender = await asyncio.to_thread(ReportSender, *addr, "ring-a", SECRET)
        sender.send(BATCH, PASSES, RELEASED)
        await until(lambda: len(got) == 1)
        sent: list[bytes] = []  # frames as the sender sealed them: counter 1 again, then counter 5
        real = sender.sock
        sender.sock = type("Capture", (), {"sendall": lambda self, data: sent.append(bytes(data))})()
        for counter in (0, 4):
            sender.counter = counter
            sender.send(BATCH, PASSES, RELEASED)
        sender.sock = real
        second = await asyncio.to_thread(raw_client, addr, good)  # while the ring's connection lives
        assert await asyncio.to_thread(closed, second)
        real.sendall(sent[0])  # a replay on the sender's own connection
        assert await asyncio.to_thread(closed, real)
        for bad in (sent[0],  # the same replay on a new connection
                    sent[1][:-1] + bytes([sent[1][-1] ^ 1]),  # a flipped bit (a counter not seen yet)
                    struct.pack("<Q", MAX_FRAME + 1)):  # more than a report may be
            s = await asyncio.to_thread(raw_client, addr, good)
            s.sendall(bad)
            assert await asyncio.to_thread(closed, s)
            s.close()
        assert server.refused == 5
        s = await asyncio.to_thread(raw_client, addr, good)
        s.sendall(sent[1])  # the genuine counter-5 frame still gets through
        await until(lambda: len(got) == 2)
        s.close()

    got = run(body)
    assert len(got) == 2 and got[1] == ("ring-a", BATCH, PASSES, RELEASED)


def test_a_forgotten_ring_is_cut_off_and_its_reports_are_dropped() -> None:
    async def body(server: ReportServer, got: list, addr: tuple[str, int]) -> None:
        sender = await asyncio.to_thread(ReportSender, *addr, "ring-a", SECRET)
        sender.send(BATCH, PASSES, RELEASED)
        await until(lambda: len(got) == 1)
        server.forget("ring-a")
        with pytest.raises(OSError):
            for _ in range(100):  # the closed socket fails a send soon (the first may still be buffered)
                await asyncio.to_thread(sender.send, BATCH, PASSES, RELEASED)
                await asyncio.sleep(0.01)

    assert len(run(body)) == 1


@pytest.mark.parametrize("raw", [b"[]", b'[[["r", [1], [], 0, 0, 0]], [[1, 2]], []]', b'[[["r", [-2], [], 0, 0, 0]], [], []]',
                                 b'[[["r", [1], [[1, NaN, []]], 0, 0, 0]], [], []]', b"\xff",
                                 b'[[["r", [true], [], 0, 0, 0]], [], []]',
                                 b'[[["r", [1], [], 0, 0]], [], []]',  # a row of five fields
                                 b'[[["r", [1, 2], [], 1, 2, 0]], [], []]',  # more accepted than drafted
                                 b'[[["r", [1], [], 3, 2, 0]], [], []]',  # more accepted than tokens
                                 b'[[], [[1, [[0, 0, 0.1, 0.5, 0]], 3]], []]',  # a pass of three fields
                                 b'[[], [[-1, [[0, 0, 0.1, 0.5, 0]]]], []]',  # negative input tokens
                                 b'[[], [[1, [[0, 0, 0.1, 0.5, -2]]]], []]',  # negative resends
                                 b'[[], [[1, [[0, 0.5, 0.1, 0.5, 0]]]], []]',  # a fractional replica
                                 b'[[], [[1, [[0, 0, 0.1, 0.5]]]], []]',  # a hop of four fields
                                 b'[[], []]',  # no released ids
                                 b'[[], [], [1]]', b'[[], [], "req-1"]'])  # released ids not strings
def test_malformed_reports_are_refused_by_name(raw: bytes) -> None:
    with pytest.raises(ValueError, match="report"):
        decode_report(raw)


def test_a_failed_token_is_reported() -> None:
    """FAILED (a sequence whose logits were NaN) rides as -1: the router ends that sequence alone."""
    assert decode_report(b'[[["r", [4, -1], [], 0, 0, 0]], [], []]')[0] == [("r", [4, -1], [], 0, 0, 0)]


def test_a_report_survives_encoding() -> None:
    assert decode_report(encode_report(BATCH, PASSES, RELEASED)) == (BATCH, PASSES, RELEASED)
