"""Tensor dtypes that travel, and zero-copy views between numpy buffers and torch tensors."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

# name -> (torch dtype, numpy dtype of its bytes, floating)
DTYPES: dict[str, tuple[torch.dtype, type, bool]] = {
    "float32": (torch.float32, np.float32, True),
    "float64": (torch.float64, np.float64, True),
    "float16": (torch.float16, np.float16, True),
    "bfloat16": (torch.bfloat16, np.int16, True),  # numpy has no bfloat16: its bits travel as int16
    "int64": (torch.int64, np.int64, False),
    "int32": (torch.int32, np.int32, False),
}


def is_int(v: object) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def numel(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of `shape`."""
    n = 1
    for d in shape:
        n *= d
    return n


def itemsize(dtype: str) -> int:
    """Bytes per element of dtype `dtype` (a DTYPES name) on the wire."""
    return np.dtype(DTYPES[dtype][1]).itemsize


def dtype_name(t: torch.Tensor) -> str:
    """t's dtype as a DTYPES name, or ValueError when it cannot travel."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"tensor dtype {name} is not supported by the message codec; "
                         f"supported: {tuple(DTYPES)}")
    return name


def bytes_of(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a 1-D uint8 numpy array (same memory)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def serial_copy(dst: np.ndarray, t: torch.Tensor) -> bool:
    """Copies a contiguous CPU tensor's bytes into `dst` as one memcpy, on this thread; False (nothing
    copied) for other tensors. torch's copy_ splits a large copy over its OpenMP threads, and a thread whose
    core another stage is using holds the whole copy up: 64 x 2048 floats took 2.3 ms instead of 17 us
    beside a busy core (2 threads, 2 cores)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return False
    np.copyto(dst, bytes_of(t))
    return True


PARALLEL_COPY_ELEMENTS = 32768  # torch's grain size: copies of fewer elements stay on the calling thread


def serial_clone(t: torch.Tensor) -> torch.Tensor:
    """`t.clone()`, copied by `serial_copy` where torch would split the copy over threads."""
    if t.numel() < PARALLEL_COPY_ELEMENTS or t.device.type != "cpu" or not t.is_contiguous():
        return t.clone()
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    np.copyto(bytes_of(out), bytes_of(t))
    return out


def torch_view(buf: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A writable uint8 numpy buffer as a 1-D torch tensor of `dtype` (same memory)."""
    if buf.size == 0:  # numpy may give empty arrays stride 0, which view(dtype) rejects
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(buf).view(dtype)


def as_u8(buf: Any) -> np.ndarray:
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


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, also for read-only arrays (Ray's object store) without the warning."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():  # from_numpy warns on read-only arrays; callers treat results read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def typed(buf: np.ndarray, np_dtype: type) -> np.ndarray:
    """buf (uint8) viewed as np_dtype, copied first only when misaligned."""
    if buf.ctypes.data % np.dtype(np_dtype).itemsize:
        buf = buf.copy()
    return buf.view(np_dtype)
