"""Property-based fuzzing of the message layer (hypothesis): random bytes, and valid messages with bytes
flipped, cut, or their header forged (checksum recomputed), only ever raise the layer's typed errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.wire import Header, LinkCodec, MessageError, pack, unpack
from actors.wire.framing import PREFIX_SIZE

KEY = os.urandom(32)
LINKS = [LinkCodec(), LinkCodec(codec="int8"), LinkCodec(compress="zstd"), LinkCodec(compress="lz4", encrypt=True)]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _message(link: LinkCodec) -> np.ndarray:
    h = Header(kind="step", step=3, msg_id=7, attempt=0, sender="s", seq_ids=["a", "b"], starts=[0, 4],
               lengths=[2, 1], tokens=[5, 6, 7])
    return pack(h, torch.randn(3, 16), link, KEY)


def _only_typed(wire: bytes | np.ndarray) -> None:
    try:
        unpack(wire, KEY)
    except MessageError:
        pass


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _only_typed(data)


@FUZZ
@given(st.sampled_from(range(len(LINKS))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                    min_size=1, max_size=8), st.integers(0, 10**6))
def test_flipped_and_cut_messages(link: int, flips: list[tuple[int, int]], cut: int) -> None:
    wire = bytearray(_message(LINKS[link]).tobytes())
    for at, value in flips:
        wire[at % len(wire)] = value
    _only_typed(bytes(wire))
    _only_typed(bytes(wire[:cut % len(wire)]))


@FUZZ
@given(st.sampled_from(["shape", "lengths", "dtype", "codec", "compress", "block", "tokens", "drafts"]),
       st.one_of(st.integers(-2, 2**62), st.lists(st.integers(-1, 2**72), max_size=12), st.text(max_size=8),
                 st.none()))
def test_forged_headers_with_valid_checksums(field: str, value: object) -> None:
    """A header rewritten by someone who recomputes the checksum: refused by type, never allocated blindly."""
    from actors.wire import framing

    wire = _message(LINKS[2])  # zstd: the header's shape decides the decoded size
    h, _ = unpack(wire, KEY)
    forged = {**{f: getattr(h, f) for f in Header.__dataclass_fields__}, field: value}
    try:
        raw = framing._header_bytes(forged)
    except (TypeError, ValueError):
        return
    payload = wire[PREFIX_SIZE + int(np.frombuffer(wire[8:12].tobytes(), "<u4")[0]):]
    _only_typed(_rebuild(raw, payload, wire))


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**63], [1] * 100, [2**41, 0]])
@pytest.mark.parametrize("link", [0, 1, 2])
def test_forged_shapes_past_any_tensor_are_refused_by_type(shape: list[int], link: int) -> None:
    """A zero dimension beside a huge one passed the size check (0 elements) and overflowed torch."""
    from actors.wire import framing

    wire = _message(LINKS[link])
    h, _ = unpack(wire, KEY)
    forged = {**{f: getattr(h, f) for f in Header.__dataclass_fields__}, "shape": shape}
    payload = wire[PREFIX_SIZE + int(np.frombuffer(wire[8:12].tobytes(), "<u4")[0]):]
    with pytest.raises(MessageError, match="shape"):
        unpack(_rebuild(framing._header_bytes(forged), payload, wire), KEY)


def _rebuild(hbytes: bytes, rest: np.ndarray, original: np.ndarray) -> np.ndarray:
    """The message with a new header and a checksum that matches it."""
    import struct

    import xxhash

    from actors.wire import framing

    body = rest[:-framing.CHECKSUM_SIZE]
    wire, off = framing._frame(hbytes, int(original[5]), len(body))
    wire[off:off + len(body)] = body
    struct.pack_into("<Q", wire, wire.size - framing.CHECKSUM_SIZE, xxhash.xxh3_64_intdigest(wire[:-framing.CHECKSUM_SIZE]))
    return wire
