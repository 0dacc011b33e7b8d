"""Lossless compression of a payload, on top of its codec: zstd (level 1) or lz4 frames."""

from __future__ import annotations

import threading
from collections.abc import Callable

import lz4.frame
import numpy as np
import zstandard

from actors.wire.errors import MessageError

__all__ = ["COMPRESSORS", "ZSTD_LEVEL", "compress", "compressor_names", "decompress"]

ZSTD_LEVEL = 1  # fastest standard level: activations compress little, and this runs on every hop

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


# name -> (compress, content size the frame declares, decompress)
COMPRESSORS: dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[np.ndarray], int | None],
                             Callable[[np.ndarray], bytes]]] = {
    "zstd": (lambda d: _zstd_c().compress(d), zstandard.frame_content_size,
             lambda d: _zstd_d().decompress(d)),
    "lz4": (lambda d: lz4.frame.compress(d, store_size=True),
            lambda d: lz4.frame.get_frame_info(d)["content_size"], lz4.frame.decompress),
}


def compressor_names() -> tuple[str, ...]:
    """The compression methods a link may use (or None for no compression)."""
    return tuple(COMPRESSORS)


def compress(data: np.ndarray, method: str) -> bytes:
    """`data` compressed with `method` (a COMPRESSORS name)."""
    return COMPRESSORS[method][0](data)


MAX_RATIO = 4096  # a frame may not claim more than this many bytes per byte it carries
MAX_DECODED = 4 << 30  # nor more than this in all (a message is one step's activations)


def decompress(data: np.ndarray, method: str, expected: int) -> np.ndarray:
    """Decompress to exactly `expected` bytes (the size the header implies), or MessageError. A forged
    header's size is refused before anything is allocated for it."""
    _, content_size, unpack = COMPRESSORS[method]
    if expected > MAX_DECODED or expected > MAX_RATIO * max(1, len(data)):
        raise MessageError(f"{method} payload of {len(data)} bytes claims {expected} decoded: refused "
                           "(a forged or corrupt header)")
    try:
        size = content_size(data)
        if size != expected:
            raise MessageError(f"{method} frame says {size} bytes, header implies {expected}")
        out = unpack(data)
    except (zstandard.ZstdError, RuntimeError, ValueError, MemoryError) as e:
        raise MessageError(f"{method} payload does not decompress ({e}): a sender bug or a version "
                           "mismatch; report it") from None
    if len(out) != expected:
        raise MessageError(f"{method} payload decompressed to {len(out)} bytes, header implies {expected}")
    return np.frombuffer(out, dtype=np.uint8)
