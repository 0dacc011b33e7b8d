"""The codec registry (no Ray): a codec registered here works end to end without touching other code,
and DeployConfig names the registered codecs when it rejects one."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from models import ConfigError

from actors.bench.pipeline import codec_setups
from actors.bench.codecs import bench_codecs
from actors.config import DeployConfig
from actors.wire import (
    Envelope, Header, LinkCodec, LinkInfo, Quantiser, choose_link, codec_names, register, unregister,
)

KEY = bytes(range(32))


def _size(n: int, dtype: str, block: int) -> int:
    return 4 * n


def _encode(t: torch.Tensor, dtype: str, block: int, out: np.ndarray) -> None:
    if out.size:  # an empty array cannot be viewed as float32
        torch.from_numpy(out).view(torch.float32).view(t.shape).copy_(t)


def _decode(buf: np.ndarray, shape: tuple[int, ...], dtype: str, block: int) -> torch.Tensor:
    f32 = buf.copy().view(np.float32)  # a private, aligned copy
    return torch.from_numpy(f32).view(shape).to(getattr(torch, dtype))


@pytest.fixture
def f32() -> Iterator[str]:
    """A toy codec, "f32": every floating tensor travels as float32."""
    register(Quantiser("f32", _size, _encode, _decode))
    yield "f32"
    unregister("f32")


def _header(n: int) -> Header:
    return Header(kind="step", step=1, msg_id=5, attempt=0, sender="test", seq_ids=["a"], starts=[0],
                  lengths=[n])


@pytest.mark.parametrize("compress", [None, "zstd", "lz4"])
@pytest.mark.parametrize("encrypt", [False, True])
def test_a_registered_codec_works_through_choose_link_seal_and_open(f32: str, compress: str | None,
                                                                    encrypt: bool) -> None:
    assert f32 in codec_names()
    link = choose_link(LinkInfo(same_host=False, bandwidth_gbps=10, trusted=not encrypt), codec=f32,
                       compress=compress)
    assert (link.codec, link.compress, link.encrypt) == (f32, compress, encrypt)
    t = torch.randn(3, 16, dtype=torch.float64)
    header, back = Envelope.seal(_header(3), t, link, KEY).open(KEY)
    got = (header.codec, header.compress, header.encrypted, header.dtype)
    assert got == (f32, compress, encrypt, "float64")
    assert back.dtype == torch.float64 and torch.equal(back, t.float().double())
    ids = torch.arange(7)  # integer tensors ignore the codec
    header, back = Envelope.seal(_header(7), ids, link, KEY).open(KEY)
    assert header.codec == "none" and torch.equal(back, ids)


def test_a_registered_codec_is_accepted_by_deploy_config_and_benched(f32: str) -> None:
    assert DeployConfig.of(codec=f32).wire.codec == f32
    rows = [r for r in bench_codecs(shapes=((1, 8),), repeats=1) if r["codec"] == f32]
    assert [(r["compress"], r["encrypt"]) for r in rows] == [(None, False), ("zstd", False), ("lz4", False)]
    assert all(r["ratio"] > 0 and r["max_abs_err"] == 0.0 for r in rows)
    assert {"codec": f32} in codec_setups()  # `meshpipe bench codecs` deploys it end to end too


def test_an_unregistered_codec_is_gone_everywhere(f32: str) -> None:
    unregister(f32)
    with pytest.raises(ValueError, match="LinkCodec.codec must be one of"):
        LinkCodec(f32)
    with pytest.raises(ValueError, match="codec must be one of"):
        choose_link(LinkInfo(True, None), codec=f32)
    register(Quantiser(f32, _size, _encode, _decode))  # for the fixture's teardown


def test_register_refuses_taken_and_reserved_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(Quantiser("int8", _size, _encode, _decode))
    for bad in ("auto", "", "a+b", "int8/32"):
        with pytest.raises(ValueError, match="codec name"):
            register(Quantiser(bad, _size, _encode, _decode))
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister("none")


def test_deploy_config_rejects_an_unknown_codec_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        DeployConfig.of(codec="int4")
    message = str(info.value)
    assert "int4" in message
    for name in ("auto", *codec_names()):
        assert repr(name) in message
    for name in ("auto", *codec_names()):
        assert DeployConfig.of(codec=name).wire.codec == name


def test_deploy_config_bounds_the_int8_block_at_deploy_time() -> None:
    """Before, a block past the wire's limit was accepted here and failed later, on the first message."""
    with pytest.raises(ConfigError, match="int8_block"):
        DeployConfig.of(int8_block=1 << 20)
    assert DeployConfig.of(int8_block=1 << 15).wire.int8_block == 1 << 15
