"""The codec registry: name -> how a floating tensor becomes payload bytes and back.

Every codec applies to floating tensors only; integer tensors (token ids) always travel as raw bytes
under ``none``. Registered here:

- ``none``: the tensor's bytes (bfloat16 as its int16 bits). Bit-exact.
- ``fp16``: cast to float16 and back to the original dtype. Values beyond the float16 range (and +-inf)
  are clamped to +-65504 instead of becoming inf; NaN stays NaN.
- ``bf16``: cast to bfloat16 and back (same exponent range as float32; only the mantissa is rounded).
- ``int8``: blockwise absmax int8 with each block's top kept aside (`actors.wire.int8`).

Adding a codec is one `register(Quantiser(...))` call: `LinkCodec`, `choose_link`, the header check,
`DeployConfig` and the codec bench all read `codec_names()`.

Decoded tensors are on the CPU, in the original dtype and shape. They may share memory with the wire
(``none``, or a cast codec whose dtype equals the tensor's, without compression/encryption: zero copy)
or with a private decode buffer: treat them as read-only (they are read-only shared memory when the wire
came from Ray's object store); ``.clone()`` one you need to write into. Codecs that convert (int8, a
cast to another dtype) return fresh tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.wire import int8
from actors.wire.buffers import (
    DTYPES, as_u8, dtype_name, from_numpy, is_int, itemsize, numel, serial_copy, torch_view, typed,
)
from actors.wire.errors import MessageError

__all__ = [
    "FP16_MAX", "MAX_BLOCK", "QUANTISERS", "Quantiser", "block_problem", "codec_names", "decode_tensor",
    "effective_codec", "encode_into", "encode_tensor", "encoded_size", "int8_error_bound", "register",
    "unregister",
]

FP16_MAX = 65504.0
MAX_BLOCK = int8.MAX_BLOCK
MIN_BLOCK = 8


@dataclass(frozen=True)
class Quantiser:
    """One codec: sizes, encodes and decodes a floating tensor's payload (uncompressed, unencrypted)."""

    name: str  # what LinkCodec.codec, the header and DeployConfig.codec call it
    size: Callable[[int, str, int], int]  # (elements, dtype name, block) -> payload bytes
    encode: Callable[[torch.Tensor, str, int, np.ndarray], None]  # (tensor, dtype, block, out): fill `out`
    decode: Callable[[np.ndarray, tuple[int, ...], str, int], torch.Tensor]  # (payload, shape, dtype, block)
    lossless: bool = False  # decodes bit-exactly
    error_bound: Callable[[torch.Tensor, int], torch.Tensor] | None = None  # (tensor, block) -> per element


QUANTISERS: dict[str, Quantiser] = {}


def register(q: Quantiser, replace: bool = False) -> Quantiser:
    """Adds `q` to the registry (ValueError if its name is taken and not `replace`); returns it."""
    if not isinstance(q.name, str) or not q.name or q.name == "auto" or "+" in q.name or "/" in q.name:
        raise ValueError(f"codec name must be a non-empty str other than 'auto', without '+' or '/', "
                         f"got {q.name!r}")
    if q.name in QUANTISERS and not replace:
        raise ValueError(f"codec {q.name!r} is already registered")
    QUANTISERS[q.name] = q
    return q


def unregister(name: str) -> None:
    """Removes codec `name` (``none`` carries integer tensors and stays)."""
    if name == "none":
        raise ValueError("codec 'none' carries integer tensors and cannot be unregistered")
    QUANTISERS.pop(name, None)


def codec_names() -> tuple[str, ...]:
    """The registered codec names, in registration order."""
    return tuple(QUANTISERS)


def block_problem(block: object) -> str | None:
    """What is wrong with a block size (None when nothing)."""
    if not is_int(block) or not MIN_BLOCK <= block <= MAX_BLOCK:  # type: ignore[operator]
        return f"must be an int in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}"
    return None


def effective_codec(dtype: str, codec: str) -> str:
    """The codec a tensor of `dtype` travels under: `codec` if floating, else ``none``."""
    return codec if DTYPES[dtype][2] else "none"


def encoded_size(n: int, dtype: str, codec: str, block: int) -> int:
    """Bytes of the encoded (uncompressed, unencrypted) payload of n elements."""
    return QUANTISERS[effective_codec(dtype, codec)].size(n, dtype, block)


def encode_into(t: torch.Tensor, dtype: str, codec: str, block: int, out: np.ndarray) -> None:
    """Writes t's encoded bytes into `out` (writable uint8, encoded_size bytes); t may be strided or GPU."""
    QUANTISERS[codec].encode(t, dtype, block, out)


def encode_tensor(t: torch.Tensor, codec: str, block: int = 64) -> np.ndarray:
    """The raw (uncompressed, unencrypted) payload of t under `codec`, as a 1-D uint8 array.

    Integer tensors ignore the codec (raw bytes). Strided, 0-d, empty and GPU tensors are fine.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"encode_tensor needs a torch.Tensor, got {type(t).__name__}")
    if codec not in QUANTISERS:
        raise ValueError(f"codec must be one of {codec_names()}, got {codec!r}")
    problem = block_problem(block)
    if problem:
        raise ValueError(f"block {problem}")
    t = t.detach()
    dtype = dtype_name(t)
    codec = effective_codec(dtype, codec)
    out = np.empty(encoded_size(t.numel(), dtype, codec, block), dtype=np.uint8)
    encode_into(t, dtype, codec, block, out)
    return out


def decode_tensor(buf: Any, shape: tuple[int, ...], dtype: str, codec: str, block: int = 64) -> torch.Tensor:
    """Inverse of encode_tensor: a CPU tensor of `shape` and `dtype` (may alias buf: see the module doc)."""
    shape = tuple(shape)
    if dtype not in DTYPES:
        raise MessageError(f"unknown dtype {dtype!r}; supported: {tuple(DTYPES)}")
    if codec not in QUANTISERS:
        raise MessageError(f"unknown codec {codec!r}; supported: {codec_names()}")
    buf = as_u8(buf)
    codec = effective_codec(dtype, codec)
    if block_problem(block):
        raise MessageError(f"int8 block must be in [{MIN_BLOCK}, {MAX_BLOCK}], got {block!r}")
    expected = encoded_size(numel(shape), dtype, codec, block)
    if buf.size != expected:
        raise MessageError(f"payload holds {buf.size} bytes but shape {shape} {dtype} under codec {codec} "
                           f"needs {expected}: a sender bug or a version mismatch; report it")
    return QUANTISERS[codec].decode(buf, shape, dtype, block)


def int8_error_bound(t: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-element int8 error bound (float64, t's shape): the absmax of the element's block / 127."""
    return int8.error_bound(t, block)


# ------------------------------------------------------------------------------------ the codecs
def _raw_size(n: int, dtype: str, block: int) -> int:
    return n * itemsize(dtype)


def _raw_encode(t: torch.Tensor, dtype: str, block: int, out: np.ndarray) -> None:
    if not serial_copy(out, t):  # a CPU tensor's bytes as one memcpy (a batch of 64: 84 us, not 5.6 ms)
        torch_view(out, DTYPES[dtype][0]).view(t.shape).copy_(t)  # one pass, strides and devices handled


def _raw_decode(buf: np.ndarray, shape: tuple[int, ...], dtype: str, block: int) -> torch.Tensor:
    tdtype, np_dtype, _ = DTYPES[dtype]
    out = from_numpy(typed(buf, np_dtype))
    return (out.view(tdtype) if dtype == "bfloat16" else out).view(shape)


def _cast(name: str, wire_dtype: str, clamp: float | None) -> Quantiser:
    """A codec that casts to `wire_dtype` (clamping to +-clamp, NaN kept) and back on decode."""
    wire_torch = DTYPES[wire_dtype][0]

    def size(n: int, dtype: str, block: int) -> int:
        return n * itemsize(wire_dtype)

    def encode(t: torch.Tensor, dtype: str, block: int, out: np.ndarray) -> None:
        dst = torch_view(out, wire_torch)
        dst.view(t.shape).copy_(t)  # cast + gather in one pass
        if clamp is not None and t.dtype != wire_torch:
            dst.clamp_(-clamp, clamp)  # overflow (inf after the cast) -> +-clamp; NaN stays NaN

    def decode(buf: np.ndarray, shape: tuple[int, ...], dtype: str, block: int) -> torch.Tensor:
        return _raw_decode(buf, shape, wire_dtype, block).to(DTYPES[dtype][0])

    return Quantiser(name, size, encode, decode)


register(Quantiser("none", _raw_size, _raw_encode, _raw_decode, lossless=True))
register(_cast("fp16", "float16", FP16_MAX))
register(_cast("bf16", "bfloat16", None))
register(Quantiser("int8", int8.size, int8.encode_into, int8.decode, error_bound=int8.error_bound))
