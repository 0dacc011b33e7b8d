"""Per-link message encoding: a pure policy the router applies to every hop of a route.

`codec="auto"` sends raw values (lossless) and adds zstd only where the link is slow enough that
the bytes saved outweigh compressing them; within a node nothing is compressed (shared memory).
An explicit codec (`fp16`, `bf16`, `int8`, `none`) or `compress` applies on every link. Links the
topology marks untrusted are encrypted (`encryption="auto"`), or all links (`"always"`), or none.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.codec import LinkCodec

ZSTD_GBPS = 0.6  # zstd (level 1) compress + decompress on one core, GB/s (codec bench, README)
ZSTD_SAVING = 0.06  # fraction of bytes zstd saves on fp32 activations (lz4 saves ~0; codec bench, README)


@dataclass(frozen=True)
class LinkInfo:
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
