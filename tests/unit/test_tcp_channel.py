"""`TcpChannel` / `TcpListener` without Ray: frames, the link secret, a closed peer, oversized frames."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from actors.channels import TcpChannel, TcpListener
from actors.wire.channel_frame import ChannelError, ChannelTimeoutError

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
        intruder.sendall(b"MPR1" + b"x" * 32)
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
    with pytest.raises(ChannelError):
        b.recv_bytes()  # no timeout: only the close can end it
    assert time.monotonic() - t0 < 5
    with pytest.raises(ChannelError):  # a failed channel stays failed
        b.send_bytes(b"x")
    b.close()


def test_a_frame_over_the_limit_is_refused_before_reading_it() -> None:
    listener = TcpListener()
    raw = socket.create_connection((listener.host, listener.port))
    raw.sendall(b"MPR1" + SECRET)
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
