"""`TcpChannel` / `TcpListener` without Ray: frames, the link's hello, a closed peer, oversized frames."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from actors.channels import TcpChannel, TcpListener
from actors.wire.channel_frame import ChannelClosedError, ChannelError, ChannelTimeoutError
from actors.wire.hello import make_hello

SECRET = b"s" * 32


def _pair(secret: bytes = SECRET) -> tuple[TcpChannel, TcpChannel]:
    """(connecting end, accepting end) of one link on the loopback."""
    listener = TcpListener()
    out = TcpChannel.connect("a", "b", listener.host, listener.port, secret=secret, timeout_s=5)
    inbound = listener.accept(secret, "b", "a", timeout_s=5)
    listener.close()
    return out, inbound


def test_frames_and_tensors_cross_in_order_both_ways() -> None:
    a, b = _pair()
    try:
        for n in (0, 1, 4096, 3 * 2**20):
            payload = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
            a.send_bytes(payload)
            assert bytes(b.recv_bytes(timeout_s=5)) == payload
        t = torch.randn(7, 5, dtype=torch.float64)
        b.send(b"hdr", t)
        header, got = a.recv(timeout_s=5)
        assert header == b"hdr" and torch.equal(got, t)
    finally:
        a.close()
        b.close()


def test_a_peer_without_the_secret_is_refused_and_the_right_one_still_gets_in() -> None:
    listener = TcpListener()
    try:
        intruder = socket.create_connection((listener.host, listener.port))
        intruder.sendall(make_hello(b"x" * 32, "a", "b"))
        good: list[TcpChannel] = []
        t = threading.Thread(target=lambda: (time.sleep(0.2), good.append(
            TcpChannel.connect("a", "b", listener.host, listener.port, secret=SECRET, timeout_s=5))))
        t.start()
        inbound = listener.accept(SECRET, "b", "a", timeout_s=5)
        t.join()
        assert intruder.recv(1) == b""  # closed unanswered
        good[0].send_bytes(b"hello")
        assert bytes(inbound.recv_bytes(timeout_s=5)) == b"hello"
        intruder.close()
        good[0].close()
        inbound.close()
    finally:
        listener.close()


def test_no_peer_within_the_timeout_is_a_timeout_error() -> None:
    listener = TcpListener()
    try:
        with pytest.raises(ChannelTimeoutError, match="no peer connected"):
            listener.accept(SECRET, "b", "a", timeout_s=0.3)
    finally:
        listener.close()


def test_a_closed_peer_fails_a_blocked_recv_at_once() -> None:
    a, b = _pair()
    threading.Timer(0.2, a.close).start()
    t0 = time.monotonic()
    with pytest.raises(ChannelClosedError):  # a ConnectionError too: a ring member logs it as the peer gone
        b.recv_bytes()  # no timeout: only the close can end it
    assert time.monotonic() - t0 < 5
    with pytest.raises(ChannelError):  # a failed channel stays failed
        b.send_bytes(b"x")
    b.close()


def test_a_frame_over_the_limit_is_refused_before_reading_it() -> None:
    listener = TcpListener()
    raw = socket.create_connection((listener.host, listener.port))
    raw.sendall(make_hello(SECRET, "a", "b"))
    inbound = listener.accept(SECRET, "b", "a", timeout_s=5)
    raw.sendall(struct.pack("<Q", 2**40))
    with pytest.raises(ChannelError, match="over the limit"):
        inbound.recv_bytes(timeout_s=5)
    raw.close()
    inbound.close()
    listener.close()


def test_closing_the_listener_ends_a_waiting_accept_at_once() -> None:
    """A ring member waiting for a previous member that died is let go when its ring is stopped."""
    listener = TcpListener()
    got: dict = {}

    def wait() -> None:
        t0 = time.monotonic()
        try:
            listener.accept(SECRET, "b", "a", timeout_s=30)
        except ChannelError as e:
            got["error"], got["took"] = e, time.monotonic() - t0

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    listener.close()
    t.join(timeout=5)
    assert not t.is_alive() and "closed while waiting" in str(got["error"]) and got["took"] < 2


def _capture_hello(secret: bytes) -> bytes:
    """What `TcpChannel.connect` sends a listener before its first frame."""
    server = socket.create_server(("127.0.0.1", 0))
    out = TcpChannel.connect("a", "b", "127.0.0.1", server.getsockname()[1], secret=secret, timeout_s=5)
    conn, _ = server.accept()
    conn.settimeout(5)
    got = b""
    while len(got) < 68:
        got += conn.recv(68 - len(got))
    for s in (out, conn, server):
        s.close()
    return got


def test_the_secret_never_crosses_the_wire_and_a_recorded_hello_opens_nothing() -> None:
    """Someone on the path who records a hello learns nothing of the secret and cannot reuse the hello."""
    hello = _capture_hello(SECRET)
    assert SECRET not in hello and SECRET[:8] not in hello
    assert _capture_hello(SECRET) != hello  # a fresh nonce each time
    listener = TcpListener()
    try:
        first = socket.create_connection((listener.host, listener.port))
        first.sendall(hello)
        inbound = listener.accept(SECRET, "b", "a", timeout_s=5)  # the genuine hello, once
        replay = socket.create_connection((listener.host, listener.port))
        replay.sendall(hello)
        with pytest.raises(ChannelTimeoutError):
            listener.accept(SECRET, "b", "a", timeout_s=1)
        assert replay.recv(1) == b""  # refused
        for s in (first, replay, inbound):
            s.close()
    finally:
        listener.close()


def test_a_hello_for_another_link_of_the_same_secret_is_refused() -> None:
    listener = TcpListener()
    try:
        wrong = socket.create_connection((listener.host, listener.port))
        wrong.sendall(make_hello(SECRET, "c", "b"))  # c -> b, where b waits for a
        with pytest.raises(ChannelTimeoutError):
            listener.accept(SECRET, "b", "a", timeout_s=1)
        assert wrong.recv(1) == b""
        wrong.close()
    finally:
        listener.close()


def test_idle_connections_do_not_keep_the_peer_waiting() -> None:
    """Connections that never say hello are read side by side with the real peer's, not one by one."""
    listener = TcpListener()
    idle = [socket.create_connection((listener.host, listener.port)) for _ in range(20)]
    try:
        threading.Timer(0.2, lambda: TcpChannel.connect("a", "b", listener.host, listener.port, secret=SECRET,
                                                        timeout_s=5)).start()
        t0 = time.monotonic()
        inbound = listener.accept(SECRET, "b", "a", timeout_s=10)
        assert time.monotonic() - t0 < 2
        inbound.close()
    finally:
        for s in idle:
            s.close()
        listener.close()


def test_short_and_lying_frames_are_channel_errors_before_any_allocation() -> None:
    from actors.wire.channel_frame import BODY_AT, MAX_BODY, frame_descriptor, pack_message

    a, b = _pair()
    try:
        a.send_bytes(b"\0" * 10)  # shorter than a descriptor
        with pytest.raises(ChannelError, match="shorter than a message's descriptor"):
            b.recv(timeout_s=5)
        buf, length = pack_message(b"hdr", torch.zeros(4, 4))
        a.send_bytes(buf[:length - 8].numpy())  # the descriptor says 8 bytes more
        with pytest.raises(ChannelError, match="shorter than its descriptor says"):
            b.recv(timeout_s=5)
    finally:
        a.close()
        b.close()
    huge = torch.zeros(BODY_AT, dtype=torch.uint8)  # what a gloo receiver would allocate for: refused first
    huge[:8 * 5].view(torch.int64)[:] = torch.tensor([0, 0, 2, 2**31, 2**20])  # float32 (2**31, 2**20)
    with pytest.raises(ChannelError, match=f"over the limit of {MAX_BODY}"):
        frame_descriptor(huge)
