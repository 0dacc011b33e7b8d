"""The int8 block codec's kernels (actors/codec.py's `int8`): per-block scales, the block's top value
kept in bfloat16 at its position, quantised values; numpy for small CPU tensors, torch otherwise.

Layout of an int8 payload of n values in nb = ceil(n / block) blocks: scales (nb,) float32, tops
(nb,) bfloat16 bits, top positions (nb,) uint8 or int16, q (n,) int8 (`_int8_parts`).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_INT8_TINY = 127.0 / float(torch.finfo(torch.float32).max)  # ~3.7e-37: below it, 127/absmax overflows
_F32_INF_BITS = 0x7F800000  # |x| as int32 at or above this: inf or NaN
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # int8 tops beyond it are clamped (still within bound)
_BF16_MAX_BITS = 0x7F7F8000  # |x| as int32 at or above this rounds beyond bfloat16's max
INT8_CHUNK = 1 << 19  # int8 encode works on 2 MB (fp32) chunks: temporaries stay in cache

_tls = threading.local()  # per-thread int8 scratch buffers


def _nblocks(n: int, block: int) -> int:
    return -(-n // block)


def _pos_dtype(block: int) -> tuple[type, torch.dtype]:
    """How int8 top positions travel: uint8 up to 256-element blocks, else int16."""
    return (np.uint8, torch.uint8) if block <= 256 else (np.int16, torch.int16)


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


def _scratch(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread int32 and float32 scratch of at least `size` elements, reused across calls (fresh
    multi-MB buffers cost page faults on every message)."""
    bufs = getattr(_tls, "int8_scratch", None)
    if bufs is None or bufs[0].size < size:
        bufs = _tls.int8_scratch = (np.empty(size, dtype=np.int32), np.empty(size, dtype=np.float32))
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
