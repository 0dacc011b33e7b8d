"""The message format of `actors.channels`: a bytes header plus an optional tensor of any shape and dtype.

A message (`pack_message`) is one uint8 buffer: an int64 descriptor (`encode_descriptor`: header length,
dtype code or `NO_TENSOR`, ndim, dims padded to `MAX_DIMS`), then at `BODY_AT` the body: the header,
padding to `ALIGN`, the tensor's bytes. Its first `FRAME_BYTES` travel as one fixed-size send (small
messages: one send per message, one wake-up for the receiver); a longer message's rest follows. The
tensor travels as bytes, so any dtype of `DTYPES` does, whatever the transport supports;
`unpack_message` gives views of the buffer (no copy). No Ray here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.errors import MeshpipeError

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
MAX_DIMS = 8
DESCRIPTOR_LEN = 3 + MAX_DIMS  # header length, dtype code (-1: no tensor), ndim, dims
ALIGN = 16  # the tensor's bytes start at a multiple of this in the body, so `view(dtype)` is legal
NO_TENSOR = -1
BODY_AT = 96  # the body's offset in a message: after the 88-byte descriptor, 16-byte aligned
FRAME_BYTES = 4096  # a message's first send, fixed-size; (1, 576) fp32 plus a header fits in one
MAX_BODY = 1 << 31  # a descriptor claiming a longer body is refused before any buffer is allocated


class ChannelError(MeshpipeError, RuntimeError):
    """A channel failed: the peer died, the connection closed, or the message was malformed."""


class ChannelClosedError(ChannelError, ConnectionError):
    """The peer closed the connection (it stopped, or died)."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """No message (or no send completion) within the timeout; the channel is broken afterwards."""


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
        return 0 if self.dtype is None else math.prod(self.shape) * self.dtype.itemsize

    @property
    def body_len(self) -> int:
        return self.offset + self.nbytes


def encode_descriptor(header_len: int, tensor: torch.Tensor | None) -> torch.Tensor:
    """The int64 descriptor of a message (length `DESCRIPTOR_LEN`)."""
    if tensor is None:
        return torch.tensor([header_len, NO_TENSOR] + [0] * (DESCRIPTOR_LEN - 2), dtype=torch.int64)
    if tensor.dtype not in DTYPE_CODE:
        raise ChannelError(f"dtype {tensor.dtype} cannot travel on a channel (known: {list(DTYPES)})")
    if tensor.dim() > MAX_DIMS:
        raise ChannelError(f"a {tensor.dim()}-d tensor: channels carry at most {MAX_DIMS} dims")
    dims = [*tensor.shape] + [0] * (MAX_DIMS - tensor.dim())
    return torch.tensor([header_len, DTYPE_CODE[tensor.dtype], tensor.dim(), *dims], dtype=torch.int64)


def decode_descriptor(desc: torch.Tensor) -> Descriptor:
    """The `Descriptor` an `encode_descriptor` tensor carries; ChannelError if it is malformed."""
    values = desc.tolist()
    if len(values) != DESCRIPTOR_LEN:
        raise ChannelError(f"descriptor of {len(values)} values, expected {DESCRIPTOR_LEN}")
    header_len, code, ndim = values[:3]
    shape = tuple(values[3:3 + ndim]) if code != NO_TENSOR else ()
    if (header_len < 0 or not (code == NO_TENSOR or 0 <= code < len(DTYPES)) or not 0 <= ndim <= MAX_DIMS
            or min(shape, default=0) < 0):
        raise ChannelError(f"malformed descriptor {values}")
    return Descriptor(header_len, None if code == NO_TENSOR else DTYPES[code], shape)


def pack_message(header: bytes, tensor: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(buffer, length) of a message: descriptor at 0, body at `BODY_AT`, at least `FRAME_BYTES` long.

    The first `FRAME_BYTES` go as one fixed-size send (a message that fits needs no other); the rest,
    `buffer[FRAME_BYTES:length]`, follows as a second send.
    """
    desc = encode_descriptor(len(header), tensor)
    d = decode_descriptor(desc)
    length = BODY_AT + d.body_len
    buf = torch.empty(max(FRAME_BYTES, length), dtype=torch.uint8)
    buf[:DESCRIPTOR_LEN * 8] = desc.view(torch.uint8)
    if header:
        buf[BODY_AT:BODY_AT + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    if tensor is not None and d.nbytes:
        buf[BODY_AT + d.offset:length] = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return buf, length


def frame_descriptor(frame: torch.Tensor) -> Descriptor:
    """The descriptor at the start of a received frame (uint8); ChannelError for a short or malformed one."""
    if frame.numel() < BODY_AT:
        raise ChannelError(f"a frame of {frame.numel()} bytes is shorter than a message's descriptor")
    d = decode_descriptor(frame[:DESCRIPTOR_LEN * 8].view(torch.int64))
    if d.body_len > MAX_BODY:
        raise ChannelError(f"a descriptor claims a body of {d.body_len} bytes, over the limit of {MAX_BODY}")
    return d


def unpack_message(d: Descriptor, buf: torch.Tensor) -> tuple[bytes, torch.Tensor | None]:
    """(header, tensor) of a whole message buffer (`pack_message`'s layout)."""
    if buf.numel() < BODY_AT + d.body_len:
        raise ChannelError(f"a message of {buf.numel()} bytes is shorter than its descriptor says "
                           f"({BODY_AT + d.body_len})")
    return unpack_body(d, buf[BODY_AT:BODY_AT + d.body_len])


def unpack_body(d: Descriptor, body: torch.Tensor) -> tuple[bytes, torch.Tensor | None]:
    """(header, tensor) from a body; the tensor is a view of the body (no copy)."""
    header = body[:d.header_len].numpy().tobytes()
    if d.dtype is None:
        return header, None
    return header, body[d.offset:d.offset + d.nbytes].view(d.dtype).reshape(d.shape)
