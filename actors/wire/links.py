"""Per-link message encoding: `LinkCodec` (one hop's codec, compression, encryption) and the policy
`choose_link` the router applies to every hop of a route.

`codec="auto"` sends raw values (lossless) and adds zstd only where the link is slow enough that
the bytes saved outweigh compressing them; within a node nothing is compressed (shared memory).
An explicit codec (any registered one: `codec_names()`) or `compress` applies on every link. Links the
topology marks untrusted are encrypted (`encryption="auto"`), or all links (`"always"`), or none.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.wire.compress import compressor_names
from actors.wire.quant import block_problem, codec_names

__all__ = ["LinkCodec", "LinkInfo", "check_codec", "check_compress", "choose_link"]

ZSTD_GBPS = 0.6  # zstd (level 1) compress + decompress on one core, GB/s (codec bench, README)
ZSTD_SAVING = 0.06  # fraction of bytes zstd saves on fp32 activations (lz4 saves ~0; codec bench, README)


def check_codec(name: object, what: str = "codec", auto: bool = False) -> str:
    """`name` if it is a registered codec (or "auto" when allowed), else ValueError naming the valid ones."""
    valid = ("auto", *codec_names()) if auto else codec_names()
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"{what} must be one of {valid}, got {name!r}")
    return name


def check_compress(name: object, what: str = "compress") -> str | None:
    """`name` if it is None or a known compressor, else ValueError naming the valid ones."""
    if name is not None and name not in compressor_names():
        raise ValueError(f"{what} must be None or one of {compressor_names()}, got {name!r}")
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class LinkCodec:
    """How one link encodes its messages: chosen per hop by the router."""

    codec: str = "none"  # a registered codec (none | fp16 | bf16 | int8 ...): floating tensors only
    compress: str | None = None  # None | zstd | lz4: lossless, on top of the codec
    encrypt: bool = False  # AES-256-GCM with the deployment key
    block: int = 64  # int8 block size: elements per absmax scale, 8..32768

    def __post_init__(self) -> None:
        check_codec(self.codec, "LinkCodec.codec")
        check_compress(self.compress, "LinkCodec.compress")
        if not isinstance(self.encrypt, bool):
            raise ValueError(f"LinkCodec.encrypt must be a bool, got {self.encrypt!r}")
        problem = block_problem(self.block)
        if problem:
            raise ValueError(f"LinkCodec.block {problem}")

    def __str__(self) -> str:
        parts = [self.codec if self.codec != "int8" or self.block == 64 else f"int8/{self.block}"]
        parts += [self.compress] if self.compress else []
        parts += ["aes"] if self.encrypt else []
        return "+".join(parts)


@dataclass(frozen=True)
class LinkInfo:
    """What the router knows of the path between two stages."""

    same_host: bool  # sender and receiver share a node (shared-memory object store)
    bandwidth_gbps: float | None  # bottleneck bandwidth of the path between them (None: unknown/unlimited)
    trusted: bool = True  # False when any link on the path is marked untrusted


def choose_link(info: LinkInfo, codec: str = "auto", compress: str | None = None, encryption: str = "auto",
                nbytes: int = 4096, block: int = 64) -> LinkCodec:
    """How to encode one hop's messages of about `nbytes` (raw fp32) bytes."""
    encrypt = encryption == "always" or (encryption == "auto" and not info.trusted)
    if codec != "auto":
        return LinkCodec(codec=codec, compress=compress, encrypt=encrypt, block=block)
    if compress is None and not info.same_host and info.bandwidth_gbps:
        transfer_saved_s = nbytes * ZSTD_SAVING * 8 / (info.bandwidth_gbps * 1e9)
        if transfer_saved_s > nbytes / (ZSTD_GBPS * 1e9):  # below ~0.3 Gb/s
            compress = "zstd"
    return LinkCodec(codec="none", compress=compress, encrypt=encrypt, block=block)
