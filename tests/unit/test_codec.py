"""The message layer, actors.wire (no Ray): codecs, compression, checksum, encryption, header validation, keys."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch
import xxhash

from actors.wire import int8
from actors.wire import (
    ALIGN, COMPRESSORS, PREFIX_SIZE, ChecksumError, DecryptionError, Header, KeyConfigError,
    LinkCodec, MessageError, TruncatedMessageError, decode_tensor, encode_tensor, int8_error_bound, load_key,
    codec_names, new_key, pack, peek_header, unpack,
)
from models.errors import MeshpipeError

KEY = bytes(range(32))
CODECS = codec_names()
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = {  # name -> a tensor factory from a float64 source
    "empty": lambda g: _rand((0, 8), g),
    "row": lambda g: _rand((1, 576), g),
    "5x64": lambda g: _rand((5, 64), g),
    "odd": lambda g: _rand((3, 7), g),
    "0d": lambda g: _rand((), g),
    "transposed": lambda g: _rand((64, 6), g).t(),  # (6, 64), not contiguous
    "strided": lambda g: _rand((10, 90), g)[::3, ::2],  # (4, 45), steps in both dims
}


def _rand(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Normal values whose magnitude varies row to row (so blocks have different absmax)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if x.dim() >= 1 and x.numel():
        row_scale = torch.randn(x.shape[:1] + (1,) * (x.dim() - 1), generator=g, dtype=torch.float64)
        x = x * torch.exp(2 * row_scale)
    return x



@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # every random tensor here is the same on every run

def _header(b: int = 2) -> Header:
    return Header(kind="step", step=3, msg_id=41, attempt=0, sender="meshpipe/x/stage-1/replica-0",
                  seq_ids=[f"s{i}" for i in range(b)], starts=list(range(b)), lengths=[1] * b,
                  release=["old"])


def _reseal(wire: np.ndarray) -> np.ndarray:
    """Recompute the checksum (what an attacker, or a buggy sender, would do)."""
    struct.pack_into("<Q", wire, wire.size - 8, xxhash.xxh3_64_intdigest(wire[:-8]))
    return wire


def _with_header(wire: np.ndarray, header_json: bytes) -> np.ndarray:
    """The same message with other header bytes, framing and checksum made consistent."""
    magic, version, flags, reserved, hlen, plen = struct.unpack_from("<4sBBHIQ", wire, 0)
    payload = wire[PREFIX_SIZE + hlen: PREFIX_SIZE + hlen + plen]
    pad = b" " * (-(PREFIX_SIZE + len(header_json)) % ALIGN)
    head = struct.pack("<4sBBHIQ", magic, version, flags, reserved, len(header_json + pad), plen)
    out = np.concatenate([np.frombuffer(head + header_json + pad, np.uint8), payload, np.zeros(8, np.uint8)])
    return _reseal(out)


def _check_close(back: torch.Tensor, t: torch.Tensor, codec: str, block: int = 64) -> None:
    assert back.dtype == t.dtype and back.shape == t.shape and back.device.type == "cpu"
    if codec == "none":
        assert torch.equal(back, t)
    elif codec == "fp16":
        assert torch.equal(back, t.to(torch.float16).clamp(-65504, 65504).to(t.dtype))
        err = (back.double() - t.double()).abs()
        assert bool((err <= t.double().abs() * 2**-11 + 2**-25).all())
    elif codec == "bf16":
        assert torch.equal(back, t.to(torch.bfloat16).to(t.dtype))
        assert bool(((back.double() - t.double()).abs() <= t.double().abs() * 2**-8).all())
    else:
        err = (back.double() - t.double()).abs()
        assert bool((err <= int8_error_bound(t, block)).all())


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("compress", [None, *COMPRESSORS])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(codec: str, compress: str | None, dtype: torch.dtype, shape: str) -> None:
    t = SHAPES[shape](torch.Generator().manual_seed(len(shape))).to(dtype)
    header, back = unpack(pack(_header(), t, LinkCodec(codec, compress)))
    assert (header.codec, header.compress, header.dtype) == (codec, compress, str(dtype)[6:])
    assert header.shape == tuple(t.shape)
    _check_close(back, t, codec)


@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("compress", [None, *COMPRESSORS])
@pytest.mark.parametrize("codec", CODECS)
def test_token_ids_are_bit_exact_under_every_codec(codec: str, compress: str | None, encrypt: bool) -> None:
    for t in (torch.randint(0, 49152, (17,)), torch.tensor([[2**40, -5]]), torch.zeros(0, dtype=torch.int64),
              torch.randint(-9, 9, (3, 4), dtype=torch.int32), torch.arange(10)[::3], torch.tensor(7)):
        header, back = unpack(pack(_header(), t, LinkCodec(codec, compress, encrypt), KEY), KEY)
        assert header.codec == "none" and back.dtype == t.dtype and torch.equal(back, t)


@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_compression_is_lossless_on_top_of_every_codec(codec: str, encrypt: bool) -> None:
    t = torch.randn(7, 576)
    _, plain = unpack(pack(_header(), t, LinkCodec(codec)))
    for compress in COMPRESSORS:
        _, back = unpack(pack(_header(), t, LinkCodec(codec, compress, encrypt), KEY), KEY)
        assert torch.equal(back, plain)  # bit-exact against the same codec uncompressed


def test_compression_shrinks_redundant_payloads() -> None:
    t = torch.zeros(64, 576)
    t[:, :8] = 1.0
    raw = pack(_header(), t).size
    assert pack(_header(), t, LinkCodec(compress="zstd")).size < raw / 20
    assert pack(_header(), t, LinkCodec(compress="lz4")).size < raw / 20


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("block", [8, 64, 100])
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4099, 600_001])
def test_int8_within_per_block_bound_and_zero_blocks_exact(block: int, n: int, path: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "INT8_NUMPY_MAX", 10**9 if path == "numpy" else 0)
    monkeypatch.setattr(int8, "INT8_NUMPY_DECODE_MAX", 10**9 if path == "numpy" else 0)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n)  # absmax differs by block, 1e-30 .. 1e30
    x[: min(n, 2 * block)] = 0.0  # whole zero blocks
    if n > 3 * block:
        x[2 * block + 3] = -1e20  # one outlier dominates its block only
    back = decode_tensor(encode_tensor(x, "int8", block), x.shape, "float32", "int8", block)
    err = (back.double() - x.double()).abs()
    bound = int8_error_bound(x, block)
    assert bool((err <= bound).all())
    assert bool((back[: min(n, 2 * block)] == 0).all())
    assert bound.shape == x.shape


@pytest.mark.parametrize("block", [64, 100])
def test_int8_numpy_and_torch_paths_give_the_same_bytes(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3 * 6400 + 5) * torch.logspace(-3, 3, 3 * 6400 + 5)  # a partial last block
    x[:block] = 0.0
    x[block + 3] = 1e30
    ref = encode_tensor(x, "int8", block)  # numpy (small tensor), one chunk
    for numpy_max, chunk in ((0, int8.INT8_CHUNK), (0, 4096), (10**9, 4096)):  # torch, chunked torch/numpy
        monkeypatch.setattr(int8, "INT8_NUMPY_MAX", numpy_max)
        monkeypatch.setattr(int8, "INT8_CHUNK", chunk)
        assert np.array_equal(encode_tensor(x, "int8", block), ref)
    for decode_max in (0, 10**9):
        monkeypatch.setattr(int8, "INT8_NUMPY_DECODE_MAX", decode_max)
        back = decode_tensor(ref, x.shape, "float32", "int8", block)
        assert bool(((back.double() - x.double()).abs() <= int8_error_bound(x, block)).all())


def test_int8_keeps_each_blocks_top_aside() -> None:
    x = torch.randn(4, 64, dtype=torch.float64)
    x[0, 5], x[1, 0], x[2, 63] = 22000.0, -1800.0, 3.4e38  # massive activations; one beyond bfloat16's range
    x[3] = 0.0
    x[3, 7] = -2.5  # a single non-zero element
    t = x.float()
    back = unpack(pack(_header(), t, LinkCodec("int8")))[1]
    tops = t.abs().argmax(dim=1)
    for i in range(4):
        top = int(tops[i])
        rest = torch.cat([t[i, :top], t[i, top + 1:]])
        assert abs(float(back[i, top]) - float(t[i, top])) <= abs(float(t[i, top])) / 127  # bf16 (clamped)
        err = (torch.cat([back[i, :top], back[i, top + 1:]]) - rest).abs()
        assert bool((err <= rest.abs().max() / 254 * (1 + 1e-5)).all())  # the others: half a step of a2 / 127
    assert float(back[0, 5]) == float(torch.tensor(22000.0).bfloat16())
    assert back[3, 7] == -2.5 and int((back[3] != 0).sum()) == 1  # exact
    assert bool(((back.double() - t.double()).abs() <= int8_error_bound(t)).all())


@pytest.mark.parametrize("block", [256, 300])  # uint8 and int16 top positions
def test_int8_large_blocks(block: int) -> None:
    t = torch.randn(5, 301)
    wire = pack(_header(), t, LinkCodec("int8", block=block))
    back = unpack(wire)[1]
    assert bool(((back.double() - t.double()).abs() <= int8_error_bound(t, block)).all())
    assert peek_header(wire).block == block


def test_int8_top_positions_outside_their_block_are_rejected() -> None:
    t = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    wire = pack(_header(), t, LinkCodec("int8"))
    off = wire.size - 8 - (2 * 64 + 2 * 7)  # payload: 2 scales, 2 tops, 2 positions, then q
    assert int(t[0].abs().argmax()) == int(wire[off + 12])  # the stored position of block 0's top
    bad = wire.copy()
    bad[off + 12] = 64  # the first block's top position
    with pytest.raises(MessageError, match="top positions"):
        unpack(_reseal(bad))


def test_int8_error_bound_is_block_absmax_over_127() -> None:
    x = torch.tensor([1.0, -4.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 127.0, 3.0])
    b = int8_error_bound(x, block=8)
    assert torch.equal(b, torch.tensor([4 / 127] * 8 + [1.0] * 2, dtype=torch.float64))


def test_int8_is_at_least_3_5x_smaller_than_fp32() -> None:
    t = torch.randn(64, 576)  # 147 KB of fp32
    assert t.numel() * 4 >= 64 * 1024
    assert t.numel() * 4 / pack(_header(64), t, LinkCodec("int8")).size >= 3.5
    assert t.numel() * 4 / pack(_header(64), t, LinkCodec("int8", encrypt=True), KEY).size >= 3.5


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_int8_rejects_non_finite(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "INT8_NUMPY_MAX", 10**9 if path == "numpy" else 0)
    rows = 300
    for bad in (float("inf"), -float("inf"), float("nan"), -float("nan")):
        t = torch.randn(rows, 64)
        t[rows - 1, 5] = bad
        with pytest.raises(ValueError, match="finite"):
            pack(_header(), t, LinkCodec("int8"))


def test_fp16_clamps_overflow_keeps_nan() -> None:
    t = torch.tensor([1e6, -1e6, float("inf"), float("-inf"), float("nan"), 65519.0, 1.5])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        _, back = unpack(pack(_header(), t.to(dtype), LinkCodec("fp16")))
        top = torch.tensor(65504.0).to(dtype).item()  # bfloat16 rounds 65504 to 65536 on the way back
        assert back[[0, 1, 2, 3, 5]].tolist() == [top, -top, top, -top, top]
        assert back[4].isnan() and back[6] == 1.5


def test_encode_decode_tensor_directly() -> None:
    t = torch.randn(5, 33, dtype=torch.float64)
    for codec in CODECS:
        buf = encode_tensor(t, codec, block=16)
        assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1
        _check_close(decode_tensor(buf.tobytes(), (5, 33), "float64", codec, 16), t, codec, 16)
    with pytest.raises(MessageError):
        decode_tensor(np.zeros(7, np.uint8), (5, 33), "float64", "none")


def test_unpack_accepts_bytes_memoryview_and_read_only_arrays() -> None:
    t = torch.randn(4, 16)
    wire = pack(_header(), t)
    ro = wire.copy()
    ro.setflags(write=False)  # like a buffer from Ray's object store
    for form in (wire.tobytes(), memoryview(wire.tobytes()), bytearray(wire.tobytes()), ro):
        assert torch.equal(unpack(form)[1], t)


def test_converting_codecs_do_not_alias_the_wire() -> None:
    t = torch.randn(4, 64)
    links = (LinkCodec("int8"), LinkCodec("fp16"), LinkCodec("none", "zstd"), LinkCodec("none", encrypt=True))
    for link in links:
        wire = pack(_header(), t, link, KEY)
        before = wire.copy()
        _, back = unpack(wire, KEY)
        back.add_(1.0) if link.codec != "none" else None  # writable fresh memory for converting codecs
        assert np.array_equal(wire, before)


def test_payload_is_aligned_and_header_is_compact_json() -> None:
    wire = pack(_header(), torch.randn(2, 8))
    hlen = struct.unpack_from("<I", wire, 8)[0]
    assert (PREFIX_SIZE + hlen) % ALIGN == 0
    assert wire[:4].tobytes() == b"MPM1"
    d = json.loads(wire[PREFIX_SIZE: PREFIX_SIZE + hlen].tobytes())
    assert d["kind"] == "step" and d["shape"] == [2, 8]


# ------------------------------------------------------------------------------------------- the header
def test_header_fields_round_trip_and_caller_header_untouched() -> None:
    h = Header(kind="retransmit", step=2**40, msg_id=12345678901, attempt=3, sender="router",
               seq_ids=["req-1/0", "ünï", ""], starts=[0, 17, 2**33], lengths=[5, 1, 0], release=["a", "b"])
    original = Header(**{k: getattr(h, k) for k in Header.__dataclass_fields__})
    wire = pack(h, torch.randn(6, 8, dtype=torch.bfloat16), LinkCodec("int8", "lz4", True, block=16), KEY)
    assert h == original  # pack fills a copy
    got, _ = unpack(wire, KEY)
    for name in ("kind", "step", "msg_id", "attempt", "sender", "seq_ids", "starts", "lengths", "release"):
        assert getattr(got, name) == getattr(h, name), name
    assert (got.shape, got.dtype, got.codec, got.compress, got.block, got.encrypted) == (
        (6, 8), "bfloat16", "int8", "lz4", 16, True)
    assert peek_header(wire) == got  # no key needed to read the header


def test_ring_fields_round_trip() -> None:
    h = Header(kind="tokens", step=9, msg_id=9, attempt=0, sender="m", seq_ids=["a", "b"], starts=[4, 7],
               lengths=[3, 1], release=["c"], lane=2, drafts=[[5, 6], []], trace=[[0, 1, 0.5, 2.25, 0]])
    got, _ = unpack(pack(h, torch.arange(4)))
    assert (got.kind, got.lane, got.drafts, got.trace) == ("tokens", 2, [[5, 6], []], [[0, 1, 0.5, 2.25, 0]])


@pytest.mark.parametrize("doc", [
    b"not json", b"\xff\xfe", b"[1, 2]", b"null", b'"step"', b"{}",
], ids=["text", "binary", "list", "null", "string", "empty"])
def test_garbled_header_is_a_message_error(doc: bytes) -> None:
    wire = _with_header(pack(_header(), torch.randn(2, 8)), doc)
    with pytest.raises(MessageError, match="header"):
        unpack(wire)


@pytest.mark.parametrize("field,value", [
    ("step", "3"), ("step", -1), ("step", True), ("step", 1.5), ("msg_id", None), ("attempt", [0]),
    ("kind", "push"), ("kind", ["step"]), ("sender", 7), ("seq_ids", "ab"), ("seq_ids", [1, 2]),
    ("starts", [0]), ("lengths", [1, -1]), ("release", {"a": 1}), ("shape", [2, -8]), ("shape", "2x8"),
    ("shape", [2, 9]), ("dtype", "float8"), ("dtype", ["float32"]), ("codec", "int4"), ("compress", "gzip"),
    ("compress", {}), ("block", 4), ("block", "64"), ("encrypted", 1), ("encrypted", True),
    ("block", 40000), ("lane", -1), ("lane", "0"), ("drafts", "ab"), ("drafts", [[1], [2]]),
    ("drafts", [[1]]), ("drafts", [[-1], []]), ("trace", [[0, 0, 1.0, 2.0]]), ("trace", [["a", 0, 0, 0, 0]]),
    ("trace", {"x": 1}), ("lanes", 0), ("lanes", 1.5),
])
def test_wrong_typed_header_field_is_a_message_error(field: str, value: object) -> None:
    wire = pack(_header(), torch.randn(2, 8))
    hlen = struct.unpack_from("<I", wire, 8)[0]
    d = json.loads(wire[PREFIX_SIZE: PREFIX_SIZE + hlen].tobytes())
    d[field] = value
    with pytest.raises(MessageError):
        unpack(_with_header(wire, json.dumps(d).encode()))
    d.pop(field)
    with pytest.raises(MessageError, match="fields"):
        unpack(_with_header(wire, json.dumps(d).encode()))
    d[field], d["extra"] = value, 1
    with pytest.raises(MessageError, match="fields"):
        unpack(_with_header(wire, json.dumps(d).encode()))


def test_pack_validates_header_tensor_and_link() -> None:
    bad = _header()
    bad.starts = [0]
    with pytest.raises(ValueError, match="seq_ids, starts and lengths"):
        pack(bad, torch.randn(2, 8))
    with pytest.raises(ValueError, match="kind"):
        pack(Header("go", 0, 0, 0, "r", [], [], []), torch.randn(2))
    with pytest.raises(ValueError, match="dtype"):
        pack(_header(), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="LinkCodec.codec"):
        LinkCodec("int4")
    with pytest.raises(ValueError, match="LinkCodec.compress"):
        LinkCodec(compress="gzip")
    with pytest.raises(ValueError, match="LinkCodec.block"):
        LinkCodec("int8", block=4)
    assert str(LinkCodec("int8", "zstd", True)) == "int8+zstd+aes"
    assert str(LinkCodec("int8", block=32)) == "int8/32"
    with pytest.raises(ValueError, match="LinkCodec.block"):
        LinkCodec("int8", block=40000)


# ------------------------------------------------------------------------------------------- integrity
@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_every_single_byte_change_is_detected(codec: str, encrypt: bool) -> None:
    wire = pack(_header(), torch.randn(2, 8), LinkCodec(codec, encrypt=encrypt), KEY)
    assert unpack(wire, KEY)[0].codec == codec
    for pos in range(wire.size):
        for mask in (0x01, 0x80, 0xFF, 0x5A):
            bad = wire.copy()
            bad[pos] ^= mask
            with pytest.raises(ChecksumError):
                unpack(bad, KEY)
        with pytest.raises(ChecksumError):
            peek_header(bad)


@pytest.mark.parametrize("compress", [None, "zstd"])
@pytest.mark.parametrize("encrypt", [False, True])
def test_truncated_or_extended_messages(encrypt: bool, compress: str | None) -> None:
    wire = pack(_header(), torch.randn(16, 64), LinkCodec("int8", compress, encrypt), KEY)
    for cut in (1, 5, wire.size // 2, wire.size - 10, wire.size):
        with pytest.raises(TruncatedMessageError):
            unpack(wire[: wire.size - cut], KEY)
    for extra in (b"\x00", b"12345678", wire.tobytes()):
        with pytest.raises(TruncatedMessageError):
            unpack(wire.tobytes() + extra, KEY)
    assert issubclass(TruncatedMessageError, ChecksumError) and issubclass(ChecksumError, MessageError)
    assert issubclass(MessageError, MeshpipeError)


def test_valid_checksum_but_not_a_meshpipe_message() -> None:
    wire = pack(_header(), torch.randn(2, 8))
    for pos, value in ((0, ord("X")), (4, 9), (5, 0x80), (6, 1)):  # magic, version, unknown flag, reserved
        bad = wire.copy()
        bad[pos] = value
        with pytest.raises(MessageError) as info:
            unpack(_reseal(bad))
        assert not isinstance(info.value, ChecksumError)
    bad = wire.copy()
    bad[5] = 1  # says encrypted, header says not
    with pytest.raises(MessageError, match="flags"):
        unpack(_reseal(bad))


# ------------------------------------------------------------------------------------------ encryption
def test_encrypted_round_trip_hides_payload() -> None:
    t = torch.arange(64, dtype=torch.float32)
    wire = pack(_header(), t, LinkCodec(encrypt=True), KEY)
    assert t.numpy().tobytes() not in wire.tobytes()
    assert torch.equal(unpack(wire, KEY)[1], t)
    assert torch.equal(unpack(wire, KEY.hex())[1], t)  # any form load_key accepts
    assert not np.array_equal(wire, pack(_header(), t, LinkCodec(encrypt=True), KEY))  # fresh nonce


def test_wrong_key_is_a_decryption_error() -> None:
    wire = pack(_header(), torch.randn(2, 8), LinkCodec("int8", encrypt=True), KEY)
    with pytest.raises(DecryptionError, match="key"):
        unpack(wire, bytes(32))
    assert not issubclass(DecryptionError, ChecksumError)  # not retransmittable


def test_tampered_payload_with_recomputed_checksum_is_a_decryption_error() -> None:
    wire = pack(_header(), torch.randn(2, 8), LinkCodec(encrypt=True), KEY)
    for pos in (wire.size - 9, wire.size - 30, wire.size - 8 - 16 - 64 - 12):  # tag, ciphertext, nonce
        bad = wire.copy()
        bad[pos] ^= 1
        with pytest.raises(DecryptionError):
            unpack(_reseal(bad), KEY)


def test_tampered_header_with_recomputed_checksum_is_detected() -> None:
    wire = pack(_header(), torch.randn(2, 8), LinkCodec(encrypt=True), KEY)
    text = wire.tobytes()
    forged = np.frombuffer(text.replace(b'"step":3', b'"step":4'), np.uint8).copy()
    assert forged.size == wire.size and not np.array_equal(forged, wire)
    assert peek_header(_reseal(forged.copy())).step == 4  # the header itself is readable, not authentic
    with pytest.raises(DecryptionError):
        unpack(_reseal(forged), KEY)
    forged = np.frombuffer(text.replace(b"stage-1", b"stage-2"), np.uint8).copy()  # forge the sender
    assert forged.size == wire.size
    with pytest.raises(DecryptionError):
        unpack(_reseal(forged), KEY)
    bad = wire.copy()
    bad[12] ^= 1  # the prefix's payload length: framing, caught before decryption
    with pytest.raises(ChecksumError):
        unpack(bad, KEY)


def test_missing_or_bad_keys() -> None:
    wire = pack(_header(), torch.randn(2, 8), LinkCodec(encrypt=True), KEY)
    with pytest.raises(KeyConfigError, match="MESHPIPE_KEY"):
        unpack(wire)
    assert peek_header(wire).encrypted
    with pytest.raises(KeyConfigError):
        pack(_header(), torch.randn(2, 8), LinkCodec(encrypt=True))
    with pytest.raises(KeyConfigError):
        pack(_header(), torch.randn(2, 8), LinkCodec(encrypt=True), b"short")
    # a key on an unencrypted link is fine: the router may encrypt only some hops
    assert unpack(pack(_header(), torch.ones(2), LinkCodec(), KEY), KEY)[1].tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------ keys
def test_load_key_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHPIPE_KEY", raising=False)
    assert load_key() is None
    assert load_key(KEY) == KEY
    assert load_key(KEY.hex()) == KEY and load_key(KEY.hex().upper()) == KEY
    assert load_key(base64.b64encode(KEY).decode()) == KEY
    assert load_key(base64.urlsafe_b64encode(b"\xfb" * 32).decode()) == b"\xfb" * 32
    assert load_key(f"  {KEY.hex()}\n".encode()) == KEY
    monkeypatch.setenv("MESHPIPE_KEY", base64.b64encode(KEY).decode())
    assert load_key() == KEY
    monkeypatch.setenv("OTHER_KEY", KEY.hex())
    assert load_key(env="OTHER_KEY") == KEY
    k = new_key()
    assert len(k) == 44 and len(load_key(k)) == 32 and new_key() != k


@pytest.mark.parametrize("value", [
    "0123456789abcdef",  # too short
    "zz" * 32,  # 64 chars, not hex
    "!" * 44,  # 44 chars, not base64
    base64.b64encode(b"k" * 31).decode() + "AAAA",  # 44 chars... decodes to the wrong length
    "s3cr3t-passphrase-that-is-not-a-key",
    b"\xf0\x9f" * 10,  # non-ASCII bytes
    b"x" * 31,
    12345,
])
def test_bad_keys_never_echo_the_key(value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyConfigError) as info:
        load_key(value)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "32 raw bytes" in msg and "hex" in msg and "base64" in msg
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    assert all(text[i: i + 6] not in msg for i in range(max(1, len(text) - 5))) or len(text) < 6
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    monkeypatch.setenv("MESHPIPE_KEY", text)
    if text.strip() and len(text) not in (64, 44):
        with pytest.raises(KeyConfigError, match=r"\$MESHPIPE_KEY"):
            load_key()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("codec", CODECS)
def test_gpu_tensors_encode_on_device(codec: str) -> None:
    t = torch.randn(33, 100, device="cuda")
    _, back = unpack(pack(_header(), t, LinkCodec(codec, "lz4")))
    _check_close(back, t.cpu(), codec)
