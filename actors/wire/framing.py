"""The wire format: one hop's tensor as a checksummed, optionally compressed and encrypted message.

A message is one 1-D ``np.uint8`` array (numpy travels zero-copy through Ray's object store)::

    offset 0   prefix, 20 bytes, little-endian:
               magic b"MPM1" | version u8 | flags u8 (bit0 encrypted, bit1 compressed) | reserved u16 (0)
               | header length u32 | payload length u64
    offset 20  header: compact UTF-8 JSON of `Header`, space-padded so the payload starts 16-byte aligned
    offset P   payload: the encoded tensor (`actors.wire.quant`), compressed (zstd level 1 or lz4 frame)
               when asked; encrypted: nonce (12 random bytes) | AES-256-GCM ciphertext | tag (16), the
               prefix + header bytes being the associated data (authenticated, not secret)
    last 8     xxh3_64 of every byte before it (u64, little-endian)

`unpack` checks the framing and the checksum before anything else: any change in transit (a flipped byte,
a truncated or extended buffer) is a `ChecksumError` (`TruncatedMessageError` when the length disagrees
with the framing), which the receiver answers by asking for a resend. A message whose checksum holds but
whose AES-GCM tag does not is a `DecryptionError` (wrong key, or tampering with a recomputed checksum):
do not retry it blindly. Unencrypted messages are protected against accidents only, not against an
attacker (who can recompute the checksum). No pickle anywhere: the header is JSON validated field by field.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from actors.wire import compress as compression
from actors.wire import crypto
from actors.wire.buffers import DTYPES, as_u8, dtype_name, is_int, numel
from actors.wire.errors import ChecksumError, KeyConfigError, MessageError, TruncatedMessageError
from actors.wire.links import LinkCodec, check_codec, check_compress
from actors.wire.quant import block_problem, decode_tensor, effective_codec, encode_into, encoded_size

__all__ = ["ALIGN", "CHECKSUM_SIZE", "KINDS", "PREFIX_SIZE", "Header", "pack", "peek_header", "unpack"]

KINDS = ("step", "retransmit", "rebuild", "tokens", "train", "grad")  # "tokens": a decode ring's sampled
# tokens, last stage -> first; "train" / "grad": a training step's activations forward / their gradients back
MAGIC = b"MPM1"
VERSION = 1
_PREFIX = struct.Struct("<4sBBHIQ")  # magic, version, flags, reserved, header length, payload length
PREFIX_SIZE = _PREFIX.size  # 20
CHECKSUM_SIZE = 8
MAX_DIMS = 8  # a tensor's dimensions at most (a forged shape is refused before any size is computed)
ALIGN = 16  # the payload starts at a multiple of this (zero-copy float views, SIMD-friendly)
FLAG_ENCRYPTED = 1
FLAG_COMPRESSED = 2
_KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_COMPRESSED


@dataclass(slots=True)
class Header:
    """The typed header: covered by the checksum (and by AES-GCM as associated data when encrypted)."""

    kind: str  # "step" | "retransmit" | "rebuild" | "tokens"
    step: int  # the router's step counter for the lane
    msg_id: int  # router-unique message id (the retransmission key)
    attempt: int  # 0 on the first send, 1.. on retransmissions
    sender: str  # actor name of the sender ("router" for the router)
    seq_ids: list[str]  # (B,) sequences in this micro-batch
    starts: list[int]  # (B,) tokens each sequence already has cached
    lengths: list[int]  # (B,) new tokens each sequence brings this step
    release: list[str] = field(default_factory=list)  # sequences whose caches the receiver frees first
    lane: int = 0  # decode ring: the micro-batch this message belongs to
    lanes: int = 1  # decode ring: micro-batches in flight when it left the head (how many stages compute at once)
    drafts: list[list[int]] = field(default_factory=list)  # (B,) speculative drafts ending each input ([]: none)
    tokens: list[int] = field(default_factory=list)  # (N,) the step's input token ids ([]: unknown): KV block hashes
    partial: list[str] = field(default_factory=list)  # sequences sending a prompt chunk with more to come: no sampling
    # decode ring: [stage, replica, inbound_ms, compute_ms, resends asked] per hop (the router's costs learn from it)
    trace: list[list[float]] = field(default_factory=list)
    # filled in by pack(), from the tensor and the LinkCodec:
    shape: tuple[int, ...] = ()  # the tensor's shape
    dtype: str = ""  # the tensor's dtype name ("float32", "bfloat16", "int64", ...)
    codec: str = "none"  # codec actually applied ("none" for integer tensors)
    compress: str | None = None  # None | "zstd" | "lz4"
    block: int = 64  # int8 block size
    encrypted: bool = False  # payload is AES-GCM ciphertext


_HEADER_FIELDS = tuple(Header.__dataclass_fields__)  # in declaration order (the JSON's order)
_HEADER_KEYS = frozenset(_HEADER_FIELDS)


def _ints(v: object) -> bool:
    """A list of ints (not bools) >= 0."""
    if not isinstance(v, list):
        return False
    if set(map(type, v)) == {int}:  # the usual case, checked at C speed (a batch of 64 is 64 ints a field)
        return min(v) >= 0
    return all(is_int(i) and i >= 0 for i in v)


def _strs(v: object) -> bool:
    return isinstance(v, list) and (set(map(type, v)) <= {str} or all(isinstance(s, str) for s in v))


def _trace_ok(v: object) -> bool:
    return isinstance(v, list) and all(
        isinstance(t, list) and len(t) == 5 and all(isinstance(x, (int, float)) for x in t) for t in v)


def _fields_problem(d: dict[str, Any]) -> str | None:
    """What is wrong with a header's fields, given as a dict of every field (None when nothing)."""
    if d["kind"] not in KINDS:
        return f"kind must be one of {KINDS}, got {d['kind']!r}"
    for name in ("step", "msg_id", "attempt"):
        v = d[name]
        if not is_int(v) or v < 0:
            return f"{name} must be an int >= 0, got {v!r}"
    if not isinstance(d["sender"], str):
        return f"sender must be a str, got {type(d['sender']).__name__}"
    for name in ("seq_ids", "release", "partial"):
        if not _strs(d[name]):
            return f"{name} must be a list of str"
    for name in ("starts", "lengths"):
        if not _ints(d[name]):
            return f"{name} must be a list of ints >= 0"
    seq_ids, lengths, drafts, tokens = d["seq_ids"], d["lengths"], d["drafts"], d["tokens"]
    if not is_int(d["lane"]) or d["lane"] < 0:
        return f"lane must be an int >= 0, got {d['lane']!r}"
    if not is_int(d["lanes"]) or not 1 <= d["lanes"] <= 1024:
        return f"lanes must be an int in [1, 1024], got {d['lanes']!r}"
    if not isinstance(drafts, list) or not all(_ints(x) for x in drafts) or \
            (drafts and (len(drafts) != len(seq_ids) or any(len(x) >= n for x, n in zip(drafts, lengths)))):
        return "drafts must be [] or one list of token ids per sequence, shorter than its input"
    if not _ints(tokens) or (tokens and len(tokens) != sum(lengths)):
        return "tokens must be [] or one token id (int >= 0) per packed input token"
    if not _trace_ok(d["trace"]):
        return "trace must be a list of [stage, replica, inbound_ms, compute_ms, resends]"
    if not len(seq_ids) == len(d["starts"]) == len(lengths):
        return (f"seq_ids, starts and lengths must have one entry per sequence, got lengths "
                f"{len(seq_ids)}, {len(d['starts'])}, {len(lengths)}")
    shape, dtype = d["shape"], d["dtype"]
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS or \
            not all(is_int(n) and 0 <= n < 2**40 for n in shape):
        return f"shape must be a list of at most {MAX_DIMS} ints in [0, 2**40), got {str(shape)[:100]}"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}"
    try:
        check_codec(d["codec"])
        if d["codec"] != "none" and not DTYPES[dtype][2]:
            return f"codec {d['codec']!r} applies to floating tensors only, got dtype {dtype}"
        check_compress(d["compress"])
    except ValueError as e:
        return str(e)
    problem = block_problem(d["block"])
    if problem:
        return f"block {problem}"
    if not isinstance(d["encrypted"], bool):
        return f"encrypted must be a bool, got {d['encrypted']!r}"
    return None


def _header_bytes(d: dict[str, Any]) -> bytes:
    """Compact JSON of every field, padded with spaces so that the payload after it starts ALIGN-aligned."""
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
    if not isinstance(d, dict) or d.keys() != _HEADER_KEYS:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise MessageError(f"message header has fields {keys}, expected {sorted(_HEADER_KEYS)}: "
                           "check both ends run the same meshpipe release")
    problem = _fields_problem(d)
    if problem:
        raise MessageError(f"message header is invalid: {problem}; check both ends run the same release")
    d["shape"] = tuple(d["shape"])
    h = Header(**d)
    compressed = h.compress is not None
    if h.encrypted != bool(flags & FLAG_ENCRYPTED) or compressed != bool(flags & FLAG_COMPRESSED):
        raise MessageError(f"message flags {flags:#x} disagree with its header (encrypted={h.encrypted}, "
                           f"compress={h.compress!r}): a sender bug; report it")
    return h


def _frame(hbytes: bytes, flags: int, plen: int) -> tuple[np.ndarray, int]:
    """An empty message with its prefix and header written: (wire, payload offset)."""
    off = PREFIX_SIZE + len(hbytes)
    wire = np.empty(off + plen + CHECKSUM_SIZE, dtype=np.uint8)
    _PREFIX.pack_into(wire, 0, MAGIC, VERSION, flags, 0, len(hbytes), plen)
    wire[PREFIX_SIZE:off] = np.frombuffer(hbytes, dtype=np.uint8)
    return wire, off


def pack(header: Header, tensor: torch.Tensor, link: LinkCodec = LinkCodec(),
         key: bytes | None = None, **fields: Any) -> np.ndarray:
    """The whole wire message for `tensor` as a 1-D np.uint8 array (header is not modified).

    The message's header is `header` with `fields` replaced (say `attempt=0, sender=...`) and
    shape/dtype/codec/compress/block/encrypted filled in. Raises ValueError for a bad header or
    tensor, KeyConfigError when link.encrypt and the key is missing or malformed.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"pack needs a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(link, LinkCodec):
        raise TypeError(f"link must be a LinkCodec, got {type(link).__name__}")
    if not fields.keys() <= _HEADER_KEYS:
        raise TypeError(f"pack got unknown header fields {sorted(fields.keys() - _HEADER_KEYS)}")
    t = tensor.detach()
    dtype = dtype_name(t)
    d = {k: getattr(header, k) for k in _HEADER_FIELDS}  # a plain dict: no dataclass copy
    d.update(fields)
    d.update(shape=tuple(t.shape), dtype=dtype, codec=effective_codec(dtype, link.codec),
             compress=link.compress, block=link.block, encrypted=link.encrypt)
    problem = _fields_problem(d)
    if problem:
        raise ValueError(f"Header.{problem}")
    k = None
    if link.encrypt:
        if key is None:
            raise KeyConfigError("this link encrypts but no key was given: set MESHPIPE_KEY on every node "
                                 f"({crypto.NEW_KEY_HINT}) or turn encryption off for the link")
        k = crypto.key_bytes(key)
    hbytes = _header_bytes(d)
    flags = (FLAG_ENCRYPTED if link.encrypt else 0) | (FLAG_COMPRESSED if link.compress else 0)
    size = encoded_size(t.numel(), dtype, d["codec"], link.block)

    if not link.compress and not link.encrypt:  # encode straight into the wire: no intermediate copy
        wire, off = _frame(hbytes, flags, size)
        encode_into(t, dtype, d["codec"], link.block, wire[off: off + size])
    else:
        raw = np.empty(size, dtype=np.uint8)
        encode_into(t, dtype, d["codec"], link.block, raw)
        data: Any = compression.compress(raw, link.compress) if link.compress else raw
        plen = len(data) + (crypto.OVERHEAD if k is not None else 0)
        wire, off = _frame(hbytes, flags, plen)
        if k is not None:
            crypto.seal_into(k, data, wire[:off], wire[off: off + plen])
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
    buf = as_u8(wire)
    flags, hlen, _ = _verify(buf)
    return _parse_header(buf[PREFIX_SIZE: PREFIX_SIZE + hlen], flags)


def unpack(wire: np.ndarray | bytes | memoryview, key: bytes | None = None) -> tuple[Header, torch.Tensor]:
    """Verify (framing, checksum), decrypt, decompress and decode a message: (header, CPU tensor).

    Raises TruncatedMessageError / ChecksumError (resend), KeyConfigError (encrypted, no usable key),
    DecryptionError (wrong key or tampering), MessageError (anything else malformed). The tensor may be
    read-only or alias the wire (see `actors.wire.quant`). A key is not required for unencrypted messages.
    """
    buf = as_u8(wire)
    flags, hlen, plen = _verify(buf)
    off = PREFIX_SIZE + hlen
    h = _parse_header(buf[PREFIX_SIZE:off], flags)
    data = buf[off: off + plen]
    if h.encrypted:
        if key is None:
            raise KeyConfigError(f"message {h.msg_id} from {h.sender!r} is encrypted but this actor has "
                                 "no key: set MESHPIPE_KEY (the same on every node)")
        data = crypto.open_payload(key, data, buf[:off], f"message {h.msg_id} from {h.sender!r}")
    if h.compress:
        size = encoded_size(numel(h.shape), h.dtype, h.codec, h.block)
        data = compression.decompress(data, h.compress, size)
    return h, decode_tensor(data, h.shape, h.dtype, h.codec, h.block)
