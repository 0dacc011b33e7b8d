"""A GGUF file, opened in milliseconds: header, metadata and tensor index in one `struct` pass that
skips over arrays (decoded on first use), tensor data memory-mapped.

gguf-py's `GGUFReader` builds a numpy view for every element of every array: SmolLM2's 49k-token
vocabulary and 48k merges cost 2-4 s in each process that opens the file (the driver, the router,
every stage). The quantisation tables and `dequantize` stay gguf-py's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
STRING, ARRAY = 8, 9
# GGUF value type -> struct format (the scalars)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
MAX_DIMS = 8  # a tensor of more dims is refused (llama.cpp writes at most 4)
MAX_NESTING = 4  # arrays of arrays deeper than this are refused (GGUF files in use nest none)
DEFAULT_ALIGNMENT = 32
# Elements of one array decoded on use: a Python list costs ~10x the file's bytes, so a forged count (or a
# multi-GB array) would be a multi-GB list; the largest vocabularies and merge lists are ~10**6.
MAX_ARRAY_ITEMS = 1 << 22


@dataclass(frozen=True)
class _Array:
    """An array value not decoded yet: its element type, length and where its elements start."""

    item_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # gguf's order: fastest-varying dim first
    tensor_type: Any  # gguf.GGMLQuantizationType
    n_bytes: int
    data: np.ndarray  # a view of the file: the element dtype for float / int types, else raw bytes


class GGUFFile:
    """An open GGUF (memory-mapped): `get(key)` for metadata, `tensors` by name, `tensor(name)` dequantized."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        self.buf = memoryview(self.map)
        self.pos = 0
        if bytes(self.buf[:4]) != MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic)")
        self.pos = 4
        self.order = "<"
        version = self._unpack("I")
        if version & 0xFFFF == 0:  # written for the other byte order
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (only {VERSIONS})")
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._unpack("I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment={alignment!r} is not a power of two")
        start = -(-self.pos // alignment) * alignment
        self.tensors = {}
        for name, dims, raw_type, offset in infos:
            if name in self.tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            self.tensors[name] = self._tensor(name, dims, raw_type, start + offset)
        self._decoded: dict[str, Any] = {}

    # ---------- metadata ----------

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value: int, float, bool, str, or a list of them (None if absent)."""
        value = self.fields.get(key)
        if value is None:
            return default
        if isinstance(value, _Array):
            if key not in self._decoded:
                self._decoded[key] = self._array(value)
            return self._decoded[key]
        return value

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in torch's shape order, in memory of its own."""
        from gguf.quants import dequantize

        from models.errors import ConfigError

        if name not in self.tensors:
            raise ConfigError(f"{self.path} has no tensor {name!r}")
        t = self.tensors[name]
        shape = tuple(reversed(t.shape))
        arr = dequantize(t.data, t.tensor_type)
        # F32/F16 tensors come back as views of the memmap: copy so nothing outlives the file.
        copy = True if np.may_share_memory(arr, t.data) else None
        return np.array(arr, dtype=np.float32, copy=copy).reshape(shape)

    # ---------- parsing (every read bounds-checked: a truncated or lying file is a ValueError) ----------

    def _take(self, n: int) -> int:
        at = self.pos
        if n < 0 or at + n > len(self.buf):
            raise ValueError(f"truncated: {n} bytes wanted at offset {at} of {len(self.buf)}")
        self.pos = at + n
        return at

    def _unpack(self, fmt: str) -> Any:
        at = self._take(struct.calcsize(fmt))
        return struct.unpack_from(self.order + fmt, self.buf, at)[0]

    def _string(self) -> str:
        n = self._unpack("Q")
        at = self._take(n)
        return str(self.buf[at:at + n], "utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self._unpack(SCALARS[vtype])
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            item_type, count = self._unpack("I"), self._unpack("Q")
            arr = _Array(item_type, count, self.pos)
            self._skip_items(item_type, count)
            return arr
        raise ValueError(f"unknown GGUF value type {vtype}")

    def _skip_items(self, item_type: int, count: int, depth: int = 0) -> None:
        if depth > MAX_NESTING:
            raise ValueError(f"arrays nested more than {MAX_NESTING} deep")
        if item_type in SCALARS:
            self._take(count * struct.calcsize(SCALARS[item_type]))
        elif item_type == STRING:
            size, buf, order = len(self.buf), self.buf, self.order + "Q"
            pos = self.pos
            for _ in range(count):  # only the lengths are read: the text is decoded on first use
                if pos + 8 > size:
                    raise ValueError(f"truncated: a string's length at offset {pos} of {size}")
                pos += 8 + struct.unpack_from(order, buf, pos)[0]
            if pos > size:
                raise ValueError(f"truncated: a string ends past the file's {size} bytes")
            self.pos = pos
        elif item_type == ARRAY:
            for _ in range(count):
                self._skip_items(self._unpack("I"), self._unpack("Q"), depth + 1)
        else:
            raise ValueError(f"unknown GGUF array element type {item_type}")

    def _array(self, a: _Array) -> list[Any]:
        if a.count > MAX_ARRAY_ITEMS:
            raise ValueError(f"a metadata array of {a.count} elements (at offset {a.offset}) is more than "
                             f"the {MAX_ARRAY_ITEMS} meshpipe reads: not a model's tokenizer")
        saved, self.pos = self.pos, a.offset
        try:
            if a.item_type in SCALARS:
                fmt = SCALARS[a.item_type]
                at = self._take(a.count * struct.calcsize(fmt))
                dtype = np.dtype(fmt).newbyteorder(self.order)
                return np.frombuffer(self.buf, dtype=dtype, count=a.count, offset=at).tolist()
            values = [self._value(a.item_type) for _ in range(a.count)]
            return [self._array(v) if isinstance(v, _Array) else v for v in values]
        finally:
            self.pos = saved

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        n_dims = self._unpack("I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name!r} claims {n_dims} dims (at most {MAX_DIMS})")
        dims = tuple(self._unpack("Q") for _ in range(n_dims))
        return name, dims, self._unpack("I"), self._unpack("Q")

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(raw_type)  # ValueError for a type gguf-py does not know
        n = int(np.prod(dims, dtype=np.float64))  # no int64 overflow on forged dims
        block, type_size = GGML_QUANT_SIZES[qtype]
        if n > len(self.buf) * block or n % block:
            raise ValueError(f"tensor {name!r}: {dims} does not fit the file")
        n_bytes = n * type_size // block
        if offset + n_bytes > len(self.buf):
            raise ValueError(f"tensor {name!r}: its {n_bytes} bytes run past the end of the file")
        plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}.get(qtype)
        shape = tuple(reversed(dims))
        if plain is None:
            data = self.map[offset:offset + n_bytes].reshape(quant_shape_to_byte_shape(shape, qtype))
        else:
            data = self.map[offset:offset + n_bytes].view(np.dtype(plain).newbyteorder(self.order)).reshape(shape)
        return GGUFTensor(name, dims, qtype, n_bytes, data)
