"""The ``int8`` codec: blockwise absmax int8 with each block's largest element kept aside.

Over the flattened tensor, blocks of ``block`` elements (the last one may be partial). Per block: its
largest-magnitude element ("top", up to ties in the last 6 mantissa bits at block 64) as bfloat16 and
its position; the others as ``q = round(x * 127 / a2)`` with ``a2`` the absmax of the block without its
top, and one float32 scale ``a2 / 127``. Every decoded element lies within ``absmax / 127`` of the
original (`error_bound`; in fact within ``a2 / 254`` plus float rounding, and the top within
``|top| / 512``); all-zero blocks decode exactly.

Why the top: LLM hidden states carry "massive activations" in a few channels (SmolLM2 after 15 layers:
~100 in every token, up to ~1,800; ~24,000 in the first token; the median block absmax is ~24), and
plain absmax int8 spends such a block's whole range on that one element. Between SmolLM2's two halves,
plain int8 changed 6 of 192 teacher-forced greedy tokens (5 at block 32, 2 at block 16); with the top
kept aside, none (like bf16). It costs 3 bytes per block: 71 bytes per 64 fp32 elements, 3.6x smaller.
Scales are float32 rather than float16: 2 more bytes per block (3.6x instead of 3.7x) but they never
overflow or underflow, so the bound holds over the whole float32 range (a block whose second absmax is
below 127/FLT_MAX ~ 3.7e-37 is quantised as if it were that, so its error stays below ~1.5e-39 rather
than absmax/127). Non-finite input raises ValueError (use a cast codec for such tensors).

Layout: scales (nblocks float32) | tops (nblocks bfloat16) | positions (nblocks uint8; int16 for blocks
over 256 elements) | q (numel int8; 0 at the tops).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from actors.wire.buffers import DTYPES, from_numpy, numel
from actors.wire.errors import MessageError

__all__ = ["INT8_CHUNK", "INT8_NUMPY_DECODE_MAX", "INT8_NUMPY_MAX", "MAX_BLOCK", "decode", "encode_into",
           "error_bound", "size"]

_INT8_TINY = 127.0 / float(torch.finfo(torch.float32).max)  # ~3.7e-37: below it, 127/absmax overflows
_F32_INF_BITS = 0x7F800000  # |x| as int32 at or above this: inf or NaN
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # int8 tops beyond it are clamped (still within bound)
_BF16_MAX_BITS = 0x7F7F8000  # |x| as int32 at or above this rounds beyond bfloat16's max
MAX_BLOCK = 1 << 15  # int8 top positions travel as uint8 (block <= 256) or int16
INT8_CHUNK = 1 << 19  # int8 encode works on 2 MB (fp32) chunks: temporaries stay in cache
INT8_NUMPY_MAX = 1 << 17  # int8 encodes CPU tensors up to this size with numpy (lower per-call overhead)
INT8_NUMPY_DECODE_MAX = 1 << 17  # and decodes up to this size with numpy; beyond, torch is faster

_tls = threading.local()  # per-thread scratch buffers


def _nblocks(n: int, block: int) -> int:
    return -(-n // block)


def _pos_dtype(block: int) -> tuple[type, torch.dtype]:
    """How int8 top positions travel: uint8 up to 256-element blocks, else int16."""
    return (np.uint8, torch.uint8) if block <= 256 else (np.int16, torch.int16)


def size(n: int, dtype: str, block: int) -> int:
    """Payload bytes of n elements: per block a float32 scale, a bfloat16 top, its position; q per element."""
    return _nblocks(n, block) * (6 + np.dtype(_pos_dtype(block)[0]).itemsize) + n


def encode_into(t: torch.Tensor, dtype: str, block: int, out: np.ndarray) -> None:
    """Quantise t (any shape, strides or device) into `out` (writable uint8 of `size` bytes)."""
    n = t.numel()
    if not n:
        return
    parts = _int8_parts(out, n, block)
    if t.device.type == "cpu" and n <= INT8_NUMPY_MAX:  # numpy's per-call overhead is ~3x lower
        _quantize_numpy(t.to(torch.float32).contiguous().numpy().reshape(-1), block, *parts)
    else:  # large CPU tensors: torch's kernels are faster; GPU tensors: quantised on the device
        _quantize_int8(t, block, *(from_numpy(p) for p in parts))


def decode(buf: np.ndarray, shape: tuple[int, ...], dtype: str, block: int) -> torch.Tensor:
    """A fresh CPU tensor of `shape` and `dtype` from an int8 payload of `size` bytes."""
    tdtype = DTYPES[dtype][0]
    n = numel(shape)
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
    scales, tops, pos, q = (from_numpy(p) for p in parts)
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


def error_bound(t: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-element int8 error bound (float64, t's shape): the absmax of the element's block / 127."""
    x = t.detach().to("cpu", torch.float64).reshape(-1)
    n = x.numel()
    if n == 0:
        return x.view(t.shape)
    pad = torch.zeros(_nblocks(n, block) * block, dtype=torch.float64)
    pad[:n] = x.abs()
    bound = pad.view(-1, block).amax(dim=1) / 127.0
    return bound.repeat_interleave(block)[:n].view(t.shape)



def _int8_parts(buf: np.ndarray, n: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An int8 payload's sections (views): scales (nb,) f32, tops (nb,) bf16 bits, positions (nb,), q (n,)."""
    nb = _nblocks(n, block)
    pos_np = _pos_dtype(block)[0]
    p = 6 * nb + nb * np.dtype(pos_np).itemsize
    return (buf[: 4 * nb].view(np.float32), buf[4 * nb: 6 * nb].view(np.int16), buf[6 * nb: p].view(pos_np),
            buf[p: p + n].view(np.int8))


def _quantize_int8(t: torch.Tensor, block: int, scales: torch.Tensor, tops: torch.Tensor, pos: torch.Tensor,
                   q: torch.Tensor) -> None:
    """Blockwise int8 of t (flattened, any device) into the CPU sections (see _int8_parts).

    Vectorised over blocks; on the CPU in chunks of INT8_CHUNK elements so the temporaries stay in cache
    (about 1.5x faster than whole-tensor passes on a 12.6 MB message; a few loop iterations at most).
    """
    n = t.numel()
    if t.dtype == torch.float32 and t.is_contiguous():
        x = t.reshape(-1)
    else:  # convert and gather in one pass
        x = torch.empty(n, dtype=torch.float32, device=t.device)
        x.view(t.shape).copy_(t)
    tops = tops.view(torch.bfloat16)
    nfull = n // block  # whole blocks; a partial last one is quantised on its own
    if nfull:
        m = x[: nfull * block].view(nfull, block)
        if x.device.type == "cpu":
            rows = max(1, INT8_CHUNK // block)
            tmp = torch.from_numpy(_scratch(min(rows, nfull) * block)[1][: min(rows, nfull) * block])
            tmp = tmp.view(-1, block)
        else:
            rows = nfull
            tmp = torch.empty((nfull, block), dtype=torch.float32, device=x.device)
        q2 = q[: nfull * block].view(nfull, block)
        for i in range(0, nfull, rows):
            j = min(i + rows, nfull)
            _quantize_rows(m[i:j], q2[i:j], scales[i:j], tops[i:j], pos[i:j], tmp)
    if nfull * block < n:
        tail = x[nfull * block:].view(1, -1)
        _quantize_rows(tail, q[nfull * block:].view(1, -1), scales[nfull:], tops[nfull:], pos[nfull:],
                       torch.empty_like(tail))


def _position_mask(block: int) -> int:
    """Low bits of |x| (float32) that carry an element's position in its block while finding the top."""
    return (1 << (block - 1).bit_length()) - 1


_NONFINITE = ("codec int8 needs finite values but the tensor holds inf or NaN; send it with codec 'none', "
              "'bf16' or 'fp16' instead")


def _quantize_rows(m: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor, t_out: torch.Tensor,
                   p_out: torch.Tensor, tmp: torch.Tensor) -> None:
    """R blocks: m (R, B) fp32 -> q_out (R, B), s_out/t_out/p_out (R,) on the CPU; tmp is scratch.

    The top is found with one integer amax: |x| as int32 (ordered like the floats) with its low bits
    replaced by its position, so the max carries its position (torch's argmax is ~10x slower). The top
    is therefore the largest element up to those low bits (2^-17 relative at block 64), and a2, read
    from the same keys, is within that of the true second absmax: both harmless for the bound.
    """
    r, b = m.shape
    mask = _position_mask(b)
    key = torch.abs(m, out=tmp[:r]).view(torch.int32)  # |x| >= 0: int order == float order (NaN on top)
    key.bitwise_and_(~mask).bitwise_or_(torch.arange(b, dtype=torch.int32, device=m.device))
    kmax = key.amax(dim=1)  # (R,)
    if int(kmax.max()) >= _F32_INF_BITS:  # an inf or NaN would be its block's top
        raise ValueError(_NONFINITE)
    idx = kmax.bitwise_and_(mask).long()[:, None]  # (R, 1) top positions
    top = m.gather(1, idx)  # (R, 1)
    key.scatter_(1, idx, 0)
    a2 = key.amax(dim=1).view(torch.float32).clamp_(min=_INT8_TINY)  # (R,) absmax without the top
    inv = torch.full_like(a2, 127.0).div_(a2)  # a true division, as numpy's (127.0 / t is reciprocal * 127)
    qf = torch.mul(m, inv[:, None], out=tmp[:r]).scatter_(1, idx, 0.0).round_()  # the top: from `tops`
    cpu = m.device.type == "cpu"
    q_out.copy_(qf if cpu else qf.to(torch.int8))
    s_out.copy_(a2.div_(127.0))
    t_out.copy_(top.view(-1).clamp_(-_BF16_MAX, _BF16_MAX))
    p_out.copy_(idx.view(-1) if cpu else idx.view(-1).to(p_out.dtype))


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread int32 and float32 scratch of at least `n` elements, reused across calls (fresh
    multi-MB buffers cost page faults on every message)."""
    bufs = getattr(_tls, "int8_scratch", None)
    if bufs is None or bufs[0].size < n:
        bufs = _tls.int8_scratch = (np.empty(n, dtype=np.int32), np.empty(n, dtype=np.float32))
    return bufs


def _quantize_numpy(x: np.ndarray, block: int, scales: np.ndarray, tops: np.ndarray, pos: np.ndarray,
                    q: np.ndarray) -> None:
    """The CPU int8 encoder (numpy, with torch's row max): x (n,) fp32 -> the sections of _int8_parts.

    Same algorithm and bytes as _quantize_int8 (the device path). Works in chunks of INT8_CHUNK
    elements, in reused scratch buffers, so temporaries stay in cache and nothing is allocated per call.
    """
    n = x.size
    step = max(1, INT8_CHUNK // block) * block  # whole blocks per chunk
    key_buf, q_buf = _scratch(min(n, step))
    nfull = n // block
    chunks = [(i, min(i + step, nfull * block)) for i in range(0, nfull * block, step)]
    if nfull * block < n:
        chunks.append((nfull * block, n))  # the partial last block
    for i, j in chunks:
        b = min(block, j - i)
        r = (j - i) // b
        first = i // block
        m = x[i:j].reshape(r, b)
        mask = np.int32(_position_mask(b))
        key = key_buf[: j - i].reshape(r, b)
        np.abs(m, out=key.view(np.float32))  # |x| >= 0: int order == float order (NaN on top)
        key &= ~mask
        torch.from_numpy(key).bitwise_or_(_positions(b))  # torch where numpy's broadcasting is slower
        kmax = _rowmax(key)
        kmax_max = int(kmax.max())
        if kmax_max >= _F32_INF_BITS:
            raise ValueError(_NONFINITE)
        idx = kmax & mask  # (R,) top positions
        flat = np.arange(0, r * b, b) + idx
        top = m.reshape(-1)[flat]
        key.reshape(-1)[flat] = 0
        a2 = _rowmax(key).view(np.float32)
        np.maximum(a2, np.float32(_INT8_TINY), out=a2)
        qf = q_buf[: j - i].reshape(r, b)
        inv = torch.from_numpy(np.float32(127.0) / a2)[:, None]
        torch.mul(torch.from_numpy(m), inv, out=torch.from_numpy(qf))
        qf.reshape(-1)[flat] = 0.0  # the top (which may overflow) is decoded from `tops`
        np.rint(qf, out=qf)  # round half to even, like torch.round; now in [-127, 127]
        np.copyto(q[i:j].reshape(r, b), qf, casting="unsafe")
        np.divide(a2, np.float32(127.0), out=scales[first: first + r])
        pos[first: first + r] = idx
        if kmax_max >= _BF16_MAX_BITS:  # beyond bfloat16's range: clamp (still within the bound)
            top = np.clip(top, -_BF16_MAX, _BF16_MAX)
        tops[first: first + r] = _bf16_bits(top)


def _rowmax(key: np.ndarray) -> np.ndarray:
    """Max over axis 1 of an int32 (R, B) array: torch's kernel beyond small sizes (numpy's is ~6x slower)."""
    if key.size <= 4096:
        return key.max(axis=1)
    return torch.from_numpy(key).amax(dim=1).numpy()


def _positions(b: int) -> torch.Tensor:
    """arange(b) as int32, cached."""
    t = _POSITIONS.get(b)
    if t is None:
        t = _POSITIONS[b] = torch.arange(b, dtype=torch.int32)
    return t


_POSITIONS: dict[int, torch.Tensor] = {}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (int16), rounding to nearest even like torch (finite, in-range inputs)."""
    bits = x.view(np.uint32)
    return ((bits + ((bits >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16).view(np.int16)


def _dequantize_numpy(scales: np.ndarray, tops: np.ndarray, pos: np.ndarray, q: np.ndarray,
                      block: int) -> np.ndarray:
    """Decode of a small int8 payload in numpy: (n,) float32."""
    n = q.size
    nfull = n // block
    out = q.astype(np.float32)
    if nfull:
        out[: nfull * block].reshape(nfull, block)[...] *= scales[:nfull, None]
    if nfull * block < n:
        out[nfull * block:] *= scales[-1]
    top = (tops.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bfloat16 bits -> float32
    out[np.arange(0, len(pos) * block, block) + pos] = top
    return out
