"""The message layer: one hop's activations as a checksummed, optionally compressed and encrypted
wire message.

Pure Python + torch/numpy (no Ray). A message is one 1-D ``np.uint8`` array (numpy travels zero-copy
through Ray's object store)::

    offset 0   prefix, 20 bytes, little-endian:
               magic b"MPM1" | version u8 | flags u8 (bit0 encrypted, bit1 compressed) | reserved u16 (0)
               | header length u32 | payload length u64
    offset 20  header: compact UTF-8 JSON of `Header`, space-padded so the payload starts 16-byte aligned
    offset P   payload: the encoded tensor (see below), compressed (zstd level 1 or lz4 frame) when asked;
               encrypted: nonce (12 random bytes) | AES-256-GCM ciphertext | tag (16), the prefix + header
               bytes being the associated data (authenticated, not secret)
    last 8     xxh3_64 of every byte before it (u64, little-endian)

`unpack` checks the framing and the checksum before anything else: any change in transit (a flipped byte,
a truncated or extended buffer) is a `ChecksumError` (`TruncatedMessageError` when the length disagrees
with the framing), which the receiver answers by asking for a resend. A message whose checksum holds but
whose AES-GCM tag does not is a `DecryptionError` (wrong key, or tampering with a recomputed checksum):
do not retry it blindly. Unencrypted messages are protected against accidents only, not against an
attacker (who can recompute the checksum). No pickle anywhere: the header is JSON validated field by field.

Codecs (floating tensors only; integer tensors such as token ids always travel as raw bytes, codec "none"):
- ``none``: the tensor's bytes (bfloat16 as its int16 bits). Bit-exact.
- ``fp16``: cast to float16 and back to the original dtype. Values beyond the float16 range (and +-inf)
  are clamped to +-65504 instead of becoming inf; NaN stays NaN.
- ``bf16``: cast to bfloat16 and back (same exponent range as float32; only the mantissa is rounded).
- ``int8``: blockwise absmax over the flattened tensor, blocks of ``block`` elements (the last one may
  be partial), with each block's largest element kept aside. Per block: its largest-magnitude element
  ("top", up to ties in the last 6 mantissa bits at block 64) as bfloat16 and its position; the others
  as ``q = round(x * 127 / a2)`` with ``a2`` the absmax of the block without its top, and one float32
  scale ``a2 / 127``. Every decoded element lies
  within ``absmax / 127`` of the original (``int8_error_bound``; in fact within ``a2 / 254`` plus
  float rounding, and the top within ``|top| / 512``); all-zero blocks decode exactly.
  Why the top: LLM hidden states carry "massive activations" in a few channels (SmolLM2 after 15
  layers: ~100 in every token, up to ~1,800; ~24,000 in the first token; the median block absmax is
  ~24), and plain absmax int8 spends such a block's whole range on that one element. Between SmolLM2's two halves, plain int8
  changed 6 of 192 teacher-forced greedy tokens (5 at block 32, 2 at block 16); with the top kept
  aside, none (like bf16). It costs 3 bytes per block: 71 bytes per 64 fp32 elements, 3.6x smaller.
  Scales are float32 rather than float16: 2 more bytes per block (3.6x instead of 3.7x) but they never
  overflow or underflow, so the bound holds over the whole float32 range (a block whose second absmax
  is below 127/FLT_MAX ~ 3.7e-37 is quantised as if it were that, so its error stays below ~1.5e-39
  rather than absmax/127). Non-finite input raises ValueError (use a cast codec for such tensors).
  Layout: scales (nblocks float32) | tops (nblocks bfloat16) | positions (nblocks uint8; int16 for
  blocks over 256 elements) | q (numel int8; 0 at the tops).

Decoded tensors are on the CPU, in the original dtype and shape. They may share memory with the wire
(codec ``none``, or a cast codec whose dtype equals the tensor's, without compression/encryption: zero
copy) or with a private decode buffer: treat them as read-only (they are read-only shared memory when the
wire came from Ray's object store); ``.clone()`` one you need to write into. Codecs that convert
(int8, a cast to another dtype) return fresh tensors.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import struct
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import lz4.frame
import numpy as np
import torch
import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from actors.int8 import (  # the int8 kernels
    _dequantize_numpy,
    _int8_parts,
    _nblocks,
    _pos_dtype,
    _quantize_int8,
    _quantize_numpy,
)
from models.errors import MeshpipeError

log = logging.getLogger(__name__)

__all__ = [
    "CODECS", "COMPRESSORS", "KINDS", "ChecksumError", "DecryptionError", "Header", "KeyConfigError",
    "LinkCodec", "MessageError", "OutOfOrderError", "ReplayError", "TruncatedMessageError", "decode_tensor",
    "encode_tensor", "int8_error_bound", "load_key", "new_key", "pack", "peek_header", "unpack",
]


# ---------------------------------------------------------------------------------------------- errors
class MessageError(MeshpipeError):
    """A message failed verification or decoding (the message says which check and what to do)."""


class ChecksumError(MessageError):
    """The message was corrupted in transit (checksum mismatch): ask the sender to resend it."""


class TruncatedMessageError(ChecksumError):
    """The message is shorter or longer than its framing says (cut or padded in transit): resend it."""


class DecryptionError(MessageError):
    """The checksum holds but AES-GCM authentication failed: wrong key or tampering. Do not retry blindly."""


class ReplayError(MessageError):
    """(Raised by the stage.) A step already applied arrived again without being marked retransmit/rebuild."""


class OutOfOrderError(MessageError):
    """(Raised by the stage.) A step skips ahead of the sequence's KV cache."""


class KeyConfigError(MessageError):
    """The encryption key is missing or malformed (the message never contains key material)."""


# ----------------------------------------------------------------------------------------- constants
CODECS = ("none", "fp16", "bf16", "int8")
COMPRESSORS = ("zstd", "lz4")  # or None
KINDS = ("step", "retransmit", "rebuild")

MAGIC = b"MPM1"
VERSION = 1
_PREFIX = struct.Struct("<4sBBHIQ")  # magic, version, flags, reserved, header length, payload length
PREFIX_SIZE = _PREFIX.size  # 20
CHECKSUM_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32  # AES-256
ALIGN = 16  # the payload starts at a multiple of this (zero-copy float views, SIMD-friendly)
ZSTD_LEVEL = 1  # fastest standard level: activations compress little, and this runs on every hop
FLAG_ENCRYPTED = 1
FLAG_COMPRESSED = 2
_KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_COMPRESSED
FP16_MAX = 65504.0
MAX_BLOCK = 1 << 15  # int8 top positions travel as uint8 (block <= 256) or int16
INT8_NUMPY_MAX = 1 << 17  # int8 encodes CPU tensors up to this size with numpy (lower per-call overhead)
INT8_NUMPY_DECODE_MAX = 1 << 17  # and decodes up to this size with numpy; beyond, torch is faster

# name -> (torch dtype, numpy dtype of its bytes, floating)
_DTYPES: dict[str, tuple[torch.dtype, type, bool]] = {
    "float32": (torch.float32, np.float32, True),
    "float64": (torch.float64, np.float64, True),
    "float16": (torch.float16, np.float16, True),
    "bfloat16": (torch.bfloat16, np.int16, True),  # numpy has no bfloat16: its bits travel as int16
    "int64": (torch.int64, np.int64, False),
    "int32": (torch.int32, np.int32, False),
}
_CAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class LinkCodec:
    """How one link encodes its messages: chosen per hop by the router."""

    codec: str = "none"  # none | fp16 | bf16 | int8: applied to floating tensors only
    compress: str | None = None  # None | zstd | lz4: lossless, on top of the codec
    encrypt: bool = False  # AES-256-GCM with the deployment key
    block: int = 64  # int8 block size: elements per absmax scale, 8..32768

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"LinkCodec.codec must be one of {CODECS}, got {self.codec!r}")
        if self.compress is not None and self.compress not in COMPRESSORS:
            raise ValueError(f"LinkCodec.compress must be None or one of {COMPRESSORS}, "
                             f"got {self.compress!r}")
        if not isinstance(self.encrypt, bool):
            raise ValueError(f"LinkCodec.encrypt must be a bool, got {self.encrypt!r}")
        if not _is_int(self.block) or not 8 <= self.block <= MAX_BLOCK:
            raise ValueError(f"LinkCodec.block must be an int in [8, {MAX_BLOCK}], got {self.block!r}")

    def __str__(self) -> str:
        parts = [self.codec if self.codec != "int8" or self.block == 64 else f"int8/{self.block}"]
        parts += [self.compress] if self.compress else []
        parts += ["aes"] if self.encrypt else []
        return "+".join(parts)


@dataclass(slots=True)
class Header:
    """The typed header: covered by the checksum (and by AES-GCM as associated data when encrypted)."""

    kind: str  # "step" | "retransmit" | "rebuild"
    step: int  # the router's step counter for the lane
    msg_id: int  # router-unique message id (the retransmission key)
    attempt: int  # 0 on the first send, 1.. on retransmissions
    sender: str  # actor name of the sender ("router" for the router)
    seq_ids: list[str]  # (B,) sequences in this micro-batch
    starts: list[int]  # (B,) tokens each sequence already has cached
    lengths: list[int]  # (B,) new tokens each sequence brings this step
    release: list[str] = field(default_factory=list)  # sequences whose caches the receiver frees first
    # filled in by pack(), from the tensor and the LinkCodec:
    shape: tuple[int, ...] = ()  # the tensor's shape
    dtype: str = ""  # the tensor's dtype name ("float32", "bfloat16", "int64", ...)
    codec: str = "none"  # codec actually applied ("none" for integer tensors)
    compress: str | None = None  # None | "zstd" | "lz4"
    block: int = 64  # int8 block size
    encrypted: bool = False  # payload is AES-GCM ciphertext


_HEADER_KEYS = frozenset(Header.__dataclass_fields__)


# -------------------------------------------------------------------------------------- validation
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _header_problem(h: Header) -> str | None:
    """What is wrong with the header's fields (None when nothing)."""
    if h.kind not in KINDS:
        return f"kind must be one of {KINDS}, got {h.kind!r}"
    for name in ("step", "msg_id", "attempt"):
        v = getattr(h, name)
        if not _is_int(v) or v < 0:
            return f"{name} must be an int >= 0, got {v!r}"
    if not isinstance(h.sender, str):
        return f"sender must be a str, got {type(h.sender).__name__}"
    for name in ("seq_ids", "release"):
        v = getattr(h, name)
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            return f"{name} must be a list of str"
    for name in ("starts", "lengths"):
        v = getattr(h, name)
        if not isinstance(v, list) or not all(_is_int(i) and i >= 0 for i in v):
            return f"{name} must be a list of ints >= 0"
    if not len(h.seq_ids) == len(h.starts) == len(h.lengths):
        return (f"seq_ids, starts and lengths must have one entry per sequence, got lengths "
                f"{len(h.seq_ids)}, {len(h.starts)}, {len(h.lengths)}")
    if not isinstance(h.shape, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in h.shape):
        return f"shape must be a list of ints >= 0, got {h.shape!r}"
    if not isinstance(h.dtype, str) or h.dtype not in _DTYPES:
        return f"dtype must be one of {tuple(_DTYPES)}, got {h.dtype!r}"
    if not isinstance(h.codec, str) or h.codec not in CODECS:
        return f"codec must be one of {CODECS}, got {h.codec!r}"
    if h.codec != "none" and not _DTYPES[h.dtype][2]:
        return f"codec {h.codec!r} applies to floating tensors only, got dtype {h.dtype}"
    if h.compress is not None and h.compress not in COMPRESSORS:
        return f"compress must be None or one of {COMPRESSORS}, got {h.compress!r}"
    if not _is_int(h.block) or not 8 <= h.block <= MAX_BLOCK:
        return f"block must be an int in [8, {MAX_BLOCK}], got {h.block!r}"
    if not isinstance(h.encrypted, bool):
        return f"encrypted must be a bool, got {h.encrypted!r}"
    return None


def _header_bytes(h: Header) -> bytes:
    """Compact JSON, padded with spaces so that the payload after it starts ALIGN-aligned."""
    d = {k: getattr(h, k) for k in Header.__dataclass_fields__}
    raw = json.dumps(d, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    pad = -(PREFIX_SIZE + len(raw)) % ALIGN
    return raw + b" " * pad


def _parse_header(buf: np.ndarray, flags: int) -> Header:
    """Header from its JSON bytes: every field's type checked (a garbled header raises MessageError)."""
    try:
        d = json.loads(buf.tobytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MessageError(f"message header is not valid JSON ({type(e).__name__}): the sender is not "
                           "meshpipe or a different version; check both ends run the same release") from None
    if not isinstance(d, dict) or set(d) != _HEADER_KEYS:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise MessageError(f"message header has fields {keys}, expected {sorted(_HEADER_KEYS)}: "
                           "check both ends run the same meshpipe release")
    h = Header(**d)
    problem = _header_problem(h)
    if problem:
        raise MessageError(f"message header is invalid: {problem}; check both ends run the same release")
    h.shape = tuple(h.shape)
    compressed = h.compress is not None
    if h.encrypted != bool(flags & FLAG_ENCRYPTED) or compressed != bool(flags & FLAG_COMPRESSED):
        raise MessageError(f"message flags {flags:#x} disagree with its header (encrypted={h.encrypted}, "
                           f"compress={h.compress!r}): a sender bug; report it")
    return h


# ---------------------------------------------------------------------------------------- codecs
def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _encoded_size(n: int, dtype: str, codec: str, block: int) -> int:
    """Bytes of the encoded (uncompressed, unencrypted) payload of n elements."""
    if codec == "none" or not _DTYPES[dtype][2]:
        return n * np.dtype(_DTYPES[dtype][1]).itemsize
    if codec == "int8":  # scale f32, top bf16, top position, q per element
        return _nblocks(n, block) * (6 + np.dtype(_pos_dtype(block)[0]).itemsize) + n
    return 2 * n  # fp16, bf16


def _effective_codec(dtype: str, codec: str) -> str:
    return codec if _DTYPES[dtype][2] else "none"


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"tensor dtype {name} is not supported by the message codec; "
                         f"supported: {tuple(_DTYPES)}")
    return name


def _torch_view(buf: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A writable uint8 numpy buffer as a 1-D torch tensor of `dtype` (same memory)."""
    if buf.size == 0:  # numpy may give empty arrays stride 0, which view(dtype) rejects
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(buf).view(dtype)


def _encode_into(t: torch.Tensor, dtype: str, codec: str, block: int, out: np.ndarray) -> None:
    """Write t's encoded bytes into `out` (writable uint8, _encoded_size bytes); t may be strided or GPU."""
    n = t.numel()
    if codec == "none":
        _torch_view(out, _DTYPES[dtype][0]).view(t.shape).copy_(t)  # one pass, strides and devices handled
    elif codec in _CAST_DTYPES:
        dst = _torch_view(out, _DTYPES[_CAST_DTYPES[codec]][0])
        dst.view(t.shape).copy_(t)  # cast + gather in one pass
        if codec == "fp16" and t.dtype != torch.float16:
            dst.clamp_(-FP16_MAX, FP16_MAX)  # overflow (inf after the cast) -> +-65504; NaN stays NaN
    elif n:  # int8
        parts = _int8_parts(out, n, block)
        if t.device.type == "cpu" and n <= INT8_NUMPY_MAX:  # numpy's per-call overhead is ~3x lower
            _quantize_numpy(t.to(torch.float32).contiguous().numpy().reshape(-1), block, *parts)
        else:  # large CPU tensors: torch's kernels are faster; GPU tensors: quantised on the device
            _quantize_int8(t, block, *(_from_numpy(p) for p in parts))


def encode_tensor(t: torch.Tensor, codec: str, block: int = 64) -> np.ndarray:
    """The raw (uncompressed, unencrypted) payload of t under `codec`, as a 1-D uint8 array.

    Integer tensors ignore the codec (raw bytes). Strided, 0-d, empty and GPU tensors are fine.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"encode_tensor needs a torch.Tensor, got {type(t).__name__}")
    LinkCodec(codec=codec, block=block)  # validates both
    t = t.detach()
    dtype = _dtype_name(t)
    codec = _effective_codec(dtype, codec)
    out = np.empty(_encoded_size(t.numel(), dtype, codec, block), dtype=np.uint8)
    _encode_into(t, dtype, codec, block, out)
    return out


def _as_u8(buf: Any) -> np.ndarray:
    """Any bytes-like or numpy buffer as a 1-D uint8 array (no copy)."""
    if isinstance(buf, np.ndarray):
        if buf.dtype == np.uint8 and buf.ndim == 1:
            return buf
        if not buf.flags.c_contiguous:
            raise TypeError("a message buffer must be C-contiguous")
        return buf.reshape(-1).view(np.uint8)
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return np.frombuffer(buf, dtype=np.uint8)
    raise TypeError(f"a message must be a numpy array, bytes, bytearray or memoryview, "
                    f"got {type(buf).__name__}")


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, also for read-only arrays (Ray's object store) without the warning."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():  # from_numpy warns on read-only arrays; callers treat results read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _typed(buf: np.ndarray, np_dtype: type) -> np.ndarray:
    """buf (uint8) viewed as np_dtype, copied first only when misaligned."""
    if buf.ctypes.data % np.dtype(np_dtype).itemsize:
        buf = buf.copy()
    return buf.view(np_dtype)


def decode_tensor(buf: Any, shape: tuple[int, ...], dtype: str, codec: str, block: int = 64) -> torch.Tensor:
    """Inverse of encode_tensor: a CPU tensor of `shape` and `dtype` (may alias buf: see the module doc)."""
    shape = tuple(shape)
    if dtype not in _DTYPES:
        raise MessageError(f"unknown dtype {dtype!r}; supported: {tuple(_DTYPES)}")
    if codec not in CODECS:
        raise MessageError(f"unknown codec {codec!r}; supported: {CODECS}")
    buf = _as_u8(buf)
    tdtype, np_dtype, floating = _DTYPES[dtype]
    codec = codec if floating else "none"
    n = _numel(shape)
    if not _is_int(block) or not 8 <= block <= MAX_BLOCK:
        raise MessageError(f"int8 block must be in [8, {MAX_BLOCK}], got {block!r}")
    expected = _encoded_size(n, dtype, codec, block)
    if buf.size != expected:
        raise MessageError(f"payload holds {buf.size} bytes but shape {shape} {dtype} under codec {codec} "
                           f"needs {expected}: a sender bug or a version mismatch; report it")
    if codec == "none":
        out = _from_numpy(_typed(buf, np_dtype))
        return (out.view(tdtype) if dtype == "bfloat16" else out).view(shape)
    if codec in _CAST_DTYPES:
        wire_dtype = _CAST_DTYPES[codec]
        out = _from_numpy(_typed(buf, _DTYPES[wire_dtype][1]))
        out = out.view(torch.bfloat16) if wire_dtype == "bfloat16" else out
        return out.view(shape).to(tdtype)
    # int8
    if n == 0:
        return torch.empty(shape, dtype=tdtype)
    if buf.ctypes.data % 4:  # keep the float32 scales aligned
        buf = buf.copy()
    parts = _int8_parts(buf, n, block)
    pos = parts[2]
    nfull = n // block
    last = n - nfull * block or block  # the last block's length
    if int(pos.max()) >= block or int(pos.min()) < 0 or int(pos[-1]) >= last:
        raise MessageError("int8 payload has top positions outside their blocks: a sender bug or a version "
                           "mismatch; report it")
    if n <= INT8_NUMPY_DECODE_MAX:
        out = torch.from_numpy(_dequantize_numpy(*parts, block)).view(shape)
        return out if tdtype == torch.float32 else out.to(tdtype)
    scales, tops, pos, q = (_from_numpy(p) for p in parts)
    out = torch.empty(n, dtype=torch.float32)
    out.copy_(q)
    if nfull:
        out[: nfull * block].view(nfull, block).mul_(scales[:nfull, None])
    if nfull * block < n:
        out[nfull * block:].mul_(scales[-1])
    where = torch.arange(0, len(pos) * block, block).add_(pos)  # flat position of each block's top
    out[where] = tops.view(torch.bfloat16).float()
    out = out.view(shape)
    return out if tdtype == torch.float32 else out.to(tdtype)


def int8_error_bound(t: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-element int8 error bound (float64, t's shape): the absmax of the element's block / 127."""
    x = t.detach().to("cpu", torch.float64).reshape(-1)
    n = x.numel()
    if n == 0:
        return x.view(t.shape)
    pad = torch.zeros(_nblocks(n, block) * block, dtype=torch.float64)
    pad[:n] = x.abs()
    bound = pad.view(-1, block).amax(dim=1) / 127.0
    return bound.repeat_interleave(block)[:n].view(t.shape)


# ------------------------------------------------------------------------------ compression, crypto
_tls = threading.local()  # zstd contexts are not thread-safe: one pair per thread


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None:
        c = _tls.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def _compress(data: np.ndarray, method: str) -> bytes:
    if method == "zstd":
        return _zstd_c().compress(data)
    return lz4.frame.compress(data, store_size=True)


def _decompress(data: np.ndarray, method: str, expected: int) -> np.ndarray:
    """Decompress to exactly `expected` bytes (the size the header implies), or MessageError."""
    try:
        if method == "zstd":
            size = zstandard.frame_content_size(data)
            if size != expected:
                raise MessageError(f"zstd frame says {size} bytes, header implies {expected}")
            out = _zstd_d().decompress(data)
        else:
            size = lz4.frame.get_frame_info(data)["content_size"]
            if size != expected:
                raise MessageError(f"lz4 frame says {size} bytes, header implies {expected}")
            out = lz4.frame.decompress(data)
    except (zstandard.ZstdError, RuntimeError, ValueError) as e:
        raise MessageError(f"{method} payload does not decompress ({e}): a sender bug or a version "
                           "mismatch; report it") from None
    if len(out) != expected:
        raise MessageError(f"{method} payload decompressed to {len(out)} bytes, header implies {expected}")
    return np.frombuffer(out, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _aead(key: bytes) -> AESGCM:
    return AESGCM(key)


def _key_bytes(key: Any) -> bytes:
    """A usable 32-byte key from pack/unpack's argument (bytes or any form load_key accepts)."""
    if isinstance(key, (bytes, bytearray, memoryview)) and len(key) == KEY_SIZE:
        return bytes(key)
    k = load_key(key)
    assert k is not None  # key is not None here, so load_key either returns bytes or raises
    return k


def load_key(value: str | bytes | None = None, env: str = "MESHPIPE_KEY") -> bytes | None:
    """The 32-byte AES-256 key from `value`, else from $env (None when neither is set).

    Accepted: 32 raw bytes, 64 hex characters, or 44 base64 characters (standard or URL-safe alphabet).
    Errors never include the key material.
    """
    source = "the key argument"
    if value is None:
        value = os.environ.get(env)
        source = f"${env}"
        if value is None or value == "":
            return None
    accepted = (f"{source} must be an AES-256 key: 32 raw bytes, 64 hex characters or 44 base64 "
                "characters (make one with `python -c 'from actors.codec import new_key; print(new_key())'`)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        if len(value) == KEY_SIZE:
            return value
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise KeyConfigError(f"{accepted}; got {len(value)} bytes that are not ASCII") from None
    if not isinstance(value, str):
        raise KeyConfigError(f"{accepted}; got a {type(value).__name__}")
    text = value.strip()
    key: bytes | None = None
    try:
        if len(text) == 2 * KEY_SIZE:
            key = bytes.fromhex(text)
        elif len(text) == 44:
            alt = "-_" if ("-" in text or "_" in text) else None
            key = base64.b64decode(text.encode("ascii"), altchars=alt.encode() if alt else None,
                                   validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        key = None
    if key is None or len(key) != KEY_SIZE:
        kind = {64: "not valid hex", 44: "not valid base64 of 32 bytes"}.get(len(text), "of the wrong length")
        raise KeyConfigError(f"{accepted}; got {len(text)} characters, {kind}")
    return key


def new_key() -> str:
    """A fresh random AES-256 key, base64 (44 characters): set it as MESHPIPE_KEY on every node."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


# -------------------------------------------------------------------------------------- pack/unpack
def pack(header: Header, tensor: torch.Tensor, link: LinkCodec = LinkCodec(),
         key: bytes | None = None) -> np.ndarray:
    """The whole wire message for `tensor` as a 1-D np.uint8 array (header is not modified).

    Fills shape/dtype/codec/compress/block/encrypted of a copy of `header`. Raises ValueError
    for a bad header or tensor, KeyConfigError when link.encrypt and the key is missing or malformed.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"pack needs a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(link, LinkCodec):
        raise TypeError(f"link must be a LinkCodec, got {type(link).__name__}")
    t = tensor.detach()
    dtype = _dtype_name(t)
    codec = _effective_codec(dtype, link.codec)
    h = replace(header, shape=tuple(t.shape), dtype=dtype, codec=codec, compress=link.compress,
                block=link.block, encrypted=link.encrypt)
    problem = _header_problem(h)
    if problem:
        raise ValueError(f"Header.{problem}")
    k = None
    if link.encrypt:
        if key is None:
            raise KeyConfigError("this link encrypts but no key was given: set MESHPIPE_KEY on every node "
                                 "(see actors.codec.new_key) or turn encryption off for the link")
        k = _key_bytes(key)
    hbytes = _header_bytes(h)
    off = PREFIX_SIZE + len(hbytes)
    flags = (FLAG_ENCRYPTED if link.encrypt else 0) | (FLAG_COMPRESSED if link.compress else 0)
    size = _encoded_size(t.numel(), dtype, codec, link.block)

    if not link.compress and not link.encrypt:  # encode straight into the wire: no intermediate copy
        wire = np.empty(off + size + CHECKSUM_SIZE, dtype=np.uint8)
        _PREFIX.pack_into(wire, 0, MAGIC, VERSION, flags, 0, len(hbytes), size)
        wire[PREFIX_SIZE:off] = np.frombuffer(hbytes, dtype=np.uint8)
        _encode_into(t, dtype, codec, link.block, wire[off: off + size])
    else:
        raw = np.empty(size, dtype=np.uint8)
        _encode_into(t, dtype, codec, link.block, raw)
        data: Any = _compress(raw, link.compress) if link.compress else raw
        plen = len(data) + (NONCE_SIZE + TAG_SIZE if link.encrypt else 0)
        wire = np.empty(off + plen + CHECKSUM_SIZE, dtype=np.uint8)
        _PREFIX.pack_into(wire, 0, MAGIC, VERSION, flags, 0, len(hbytes), plen)
        wire[PREFIX_SIZE:off] = np.frombuffer(hbytes, dtype=np.uint8)
        if link.encrypt:
            nonce = os.urandom(NONCE_SIZE)
            wire[off: off + NONCE_SIZE] = np.frombuffer(nonce, dtype=np.uint8)
            _aead(k).encrypt_into(nonce, data, wire[:off], wire[off + NONCE_SIZE: off + plen])
        else:
            wire[off: off + plen] = np.frombuffer(data, dtype=np.uint8)
    struct.pack_into("<Q", wire, wire.size - CHECKSUM_SIZE, xxhash.xxh3_64_intdigest(wire[:-CHECKSUM_SIZE]))
    return wire


def _verify(buf: np.ndarray) -> tuple[int, int, int]:
    """Framing and checksum, before anything else is trusted: (flags, header length, payload length)."""
    n = buf.size
    if n < PREFIX_SIZE + CHECKSUM_SIZE:
        raise TruncatedMessageError(f"message is {n} bytes, shorter than the smallest possible "
                                    f"({PREFIX_SIZE + CHECKSUM_SIZE}): truncated in transit; "
                                    "ask the sender to resend")
    magic, version, flags, reserved, hlen, plen = _PREFIX.unpack_from(buf, 0)
    if magic == MAGIC and PREFIX_SIZE + hlen + plen + CHECKSUM_SIZE != n:
        raise TruncatedMessageError(
            f"message is {n} bytes but its framing says {PREFIX_SIZE + hlen + plen + CHECKSUM_SIZE}: "
            "truncated "
            "or extended in transit (or its length field is corrupt); ask the sender to resend")
    (stored,) = struct.unpack_from("<Q", buf, n - CHECKSUM_SIZE)
    if xxhash.xxh3_64_intdigest(buf[:-CHECKSUM_SIZE]) != stored:
        raise ChecksumError(f"message checksum mismatch ({n} bytes): corrupted in transit; ask the sender "
                            "to resend")
    if magic != MAGIC:
        raise MessageError(f"not a meshpipe message (magic {magic!r}, expected {MAGIC!r}): check what "
                           "sends to this actor")
    if version != VERSION:
        raise MessageError(f"message format version {version}, this meshpipe reads version {VERSION}: "
                           "run the same meshpipe release on every node")
    if flags & ~_KNOWN_FLAGS or reserved:
        raise MessageError(f"message has unknown flags {flags:#x}/{reserved:#x}: run the same meshpipe "
                           "release on every node")
    return flags, hlen, plen


def peek_header(wire: np.ndarray | bytes | memoryview) -> Header:
    """The header only, after framing and checksum verification (no payload decoding or decryption).

    On an encrypted link the header is authenticated only by `unpack` (AES-GCM associated data): do not
    act on a peeked header's content where tampering matters.
    """
    buf = _as_u8(wire)
    flags, hlen, _ = _verify(buf)
    return _parse_header(buf[PREFIX_SIZE: PREFIX_SIZE + hlen], flags)


def unpack(wire: np.ndarray | bytes | memoryview, key: bytes | None = None) -> tuple[Header, torch.Tensor]:
    """Verify (framing, checksum), decrypt, decompress and decode a message: (header, CPU tensor).

    Raises TruncatedMessageError / ChecksumError (resend), KeyConfigError (encrypted, no usable key),
    DecryptionError (wrong key or tampering), MessageError (anything else malformed). The tensor may be
    read-only or alias the wire (see the module doc). A key is not required for unencrypted messages.
    """
    buf = _as_u8(wire)
    flags, hlen, plen = _verify(buf)
    off = PREFIX_SIZE + hlen
    h = _parse_header(buf[PREFIX_SIZE:off], flags)
    data = buf[off: off + plen]
    if h.encrypted:
        if key is None:
            raise KeyConfigError(f"message {h.msg_id} from {h.sender!r} is encrypted but this actor has "
                                 "no key: set MESHPIPE_KEY (the same on every node)")
        if plen < NONCE_SIZE + TAG_SIZE:
            raise MessageError(f"encrypted payload is {plen} bytes, shorter than nonce + tag: a sender bug")
        plain = np.empty(plen - NONCE_SIZE - TAG_SIZE, dtype=np.uint8)
        try:
            nonce = data[:NONCE_SIZE].tobytes()
            _aead(_key_bytes(key)).decrypt_into(nonce, data[NONCE_SIZE:], buf[:off], plain)
        except InvalidTag:
            raise DecryptionError(
                f"message {h.msg_id} from {h.sender!r} failed AES-GCM authentication although its checksum "
                "holds: the sender uses a different key, or the message was tampered with; check "
                "MESHPIPE_KEY on both nodes; do not retry blindly") from None
        data = plain
    if h.compress:
        data = _decompress(data, h.compress, _encoded_size(_numel(h.shape), h.dtype, h.codec, h.block))
    return h, decode_tensor(data, h.shape, h.dtype, h.codec, h.block)
