"""The channel message format without Ray: descriptor encode/decode, body pack/unpack, Mailbox order."""

from __future__ import annotations

import threading

import pytest
import torch

from actors.channels import Mailbox
from actors.wire.channel_frame import (
    ALIGN,
    DESCRIPTOR_LEN,
    ChannelError,
    ChannelTimeoutError,
    FRAME_BYTES,
    decode_descriptor,
    encode_descriptor,
    frame_descriptor,
    pack_message,
    unpack_message,
)

TENSORS = [
    torch.randn(1, 576), torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 5).to(torch.bfloat16),
    torch.arange(7, dtype=torch.int64), torch.tensor(3.5), torch.zeros(0, 4), torch.tensor([True, False]),
    torch.randn(4, 6).t(),  # not contiguous
    torch.randn(64, 576),  # longer than one frame
]


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}-{tuple(t.shape)}")
@pytest.mark.parametrize("header", [b"", b"h", b"x" * 37])
def test_descriptor_and_body_round_trip(header: bytes, tensor: torch.Tensor) -> None:
    desc = encode_descriptor(len(header), tensor)
    assert desc.dtype == torch.int64 and desc.shape == (DESCRIPTOR_LEN,)
    d = decode_descriptor(desc)
    assert (d.header_len, d.dtype, d.shape) == (len(header), tensor.dtype, tuple(tensor.shape))
    assert d.offset % ALIGN == 0 and d.nbytes == tensor.numel() * tensor.element_size()
    buf, length = pack_message(header, tensor)
    assert buf.numel() == max(FRAME_BYTES, length)
    got_header, got = unpack_message(frame_descriptor(buf[:FRAME_BYTES]), buf)
    assert got_header == header
    assert got is not None and got.dtype == tensor.dtype and got.shape == tensor.shape
    assert torch.equal(got, tensor)


def test_no_tensor() -> None:
    d = decode_descriptor(encode_descriptor(5, None))
    assert (d.dtype, d.shape, d.nbytes, d.body_len) == (None, (), 0, 5)
    buf, _ = pack_message(b"hello", None)
    assert unpack_message(frame_descriptor(buf), buf) == (b"hello", None)
    assert pack_message(b"", None)[0].numel() == FRAME_BYTES


def test_malformed_descriptors_are_channel_errors() -> None:
    good = encode_descriptor(3, torch.zeros(2, 2))
    for bad in (good[:-1], torch.tensor([-1, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0]), torch.tensor([0, 99] + [0] * 9),
                torch.tensor([0, 0, 9] + [1] * 8), torch.tensor([0, 0, 1, -3] + [0] * 7)):
        with pytest.raises(ChannelError):
            decode_descriptor(bad)
    with pytest.raises(ChannelError, match="dims"):
        encode_descriptor(0, torch.zeros([1] * 9))
    with pytest.raises(ChannelError, match="dtype"):
        encode_descriptor(0, torch.zeros(2, dtype=torch.complex64))


def test_mailbox_releases_in_sequence_order_and_times_out() -> None:
    box = Mailbox()
    box.put("a", 1, b"second", None)
    threading.Timer(0.05, box.put, ("a", 0, b"first", None)).start()
    assert box.get("a", 2.0)[0] == b"first"
    assert box.get("a", 0.0)[0] == b"second"
    with pytest.raises(ChannelTimeoutError):
        box.get("a", 0.05)
    with pytest.raises(ChannelTimeoutError):
        box.get("b", 0.0)
