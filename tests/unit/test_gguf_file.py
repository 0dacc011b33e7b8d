"""models.gguf_file against gguf-py's own reader (the oracle): the same metadata and tensor bytes, on a
tiny GGUF and on SmolLM2; a truncated or lying file is a ValueError at open, whatever byte it stops at."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from models.gguf_file import GGUFFile
from tests.checkpoints import TINY_CHAT_TEMPLATE, make_tiny_gguf, make_tiny_llama, smollm2_gguf_path


def _same_as_gguf_py(path: Path) -> None:
    import gguf

    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path), "r")
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert sorted(ours.fields) == sorted(keys)
    for k in keys:
        assert ours.get(k) == theirs.fields[k].contents(), k
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        o = ours.tensors[t.name]
        assert (o.tensor_type, o.shape, o.n_bytes) == (t.tensor_type, tuple(int(d) for d in t.shape), t.n_bytes)
        assert o.data.dtype == t.data.dtype and o.data.shape == t.data.shape and np.array_equal(o.data, t.data)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    return make_tiny_gguf(root / "t.gguf", make_tiny_llama(root / "hf", n_layers=2), chat_template=TINY_CHAT_TEMPLATE)


@pytest.mark.parametrize("float16", [False, True])
def test_metadata_and_tensors_are_gguf_pys(tmp_path: Path, float16: bool) -> None:
    _same_as_gguf_py(make_tiny_gguf(tmp_path / "t.gguf", make_tiny_llama(tmp_path / "hf", n_layers=2),
                                    float16=float16, chat_template=TINY_CHAT_TEMPLATE))


@pytest.mark.smollm2
def test_smollm2_reads_as_gguf_py_reads_it() -> None:
    _same_as_gguf_py(smollm2_gguf_path())  # Q4_1 blocks, 49k tokens, 48k merges


def test_a_file_cut_anywhere_is_a_value_error(tiny_gguf: Path, tmp_path: Path) -> None:
    raw = tiny_gguf.read_bytes()
    data_start = len(raw) - sum(t.n_bytes for t in GGUFFile(tiny_gguf).tensors.values())
    cut = tmp_path / "cut.gguf"
    for n in [*range(0, 64), *range(64, data_start, 97), data_start + 1, len(raw) - 1]:
        cut.write_bytes(raw[:n])
        with pytest.raises(ValueError):
            GGUFFile(cut)


def test_forged_lengths_and_counts_are_refused_before_any_large_read(tiny_gguf: Path, tmp_path: Path) -> None:
    raw = bytearray(tiny_gguf.read_bytes())
    bad = tmp_path / "bad.gguf"
    forged = raw[:16] + struct.pack("<Q", 2**62) + raw[24:]  # a metadata count no file holds
    bad.write_bytes(forged)
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(bad)
    key_len_at = 24  # the first key's length
    forged = raw[:key_len_at] + struct.pack("<Q", 2**63) + raw[key_len_at + 8:]
    bad.write_bytes(forged)
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(bad)
    bad.write_bytes(b"GGUF" + struct.pack("<I", 99) + raw[8:])
    with pytest.raises(ValueError, match="version 99"):
        GGUFFile(bad)
    bad.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        GGUFFile(bad)


def _kv_file(path: Path, key: bytes, value: bytes) -> Path:
    """A GGUF of one metadata entry and no tensors."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + value)
    return path


def test_arrays_decode_on_first_use_and_deep_nesting_is_refused(tmp_path: Path) -> None:
    words = [b"a", b"bc", b""]
    strings = struct.pack("<IIQ", 9, 8, len(words)) + b"".join(struct.pack("<Q", len(w)) + w for w in words)
    nested = struct.pack("<IIQ", 9, 9, 2) + struct.pack("<IQ", 5, 2) + struct.pack("<ii", -1, 2) \
        + struct.pack("<IQ", 5, 1) + struct.pack("<i", 7)
    assert GGUFFile(_kv_file(tmp_path / "s.gguf", b"k", strings)).get("k") == ["a", "bc", ""]
    assert GGUFFile(_kv_file(tmp_path / "n.gguf", b"k", nested)).get("k") == [[-1, 2], [7]]
    deep = struct.pack("<II", 9, 9) + struct.pack("<QI", 1, 9) * 40 + struct.pack("<Q", 0)
    with pytest.raises(ValueError, match="nested"):
        GGUFFile(_kv_file(tmp_path / "d.gguf", b"k", deep))
