"""Training data: documents into windows, the held-out split, bad data refused by name. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.data import load_documents, pack_windows, split_held_out
from models.errors import InvalidRequestError


def test_documents_are_joined_with_eos_and_cut_into_full_windows() -> None:
    w = pack_windows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    assert w.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_windows([[1, 2, 3, 4, 5]], seq_len=2).tolist() == [[1, 2], [3, 4]]  # the short tail is dropped


def test_text_files_split_on_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("first paragraph\n\n\nsecond one\n", encoding="utf-8")
    assert load_documents(f) == ["first paragraph", "second one"]

    class Chars:
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]
    assert pack_windows(load_documents(f), 5, Chars()).shape == (5, 5)  # 25 characters


def test_the_held_out_split_is_seeded_and_disjoint() -> None:
    w = torch.arange(40).view(20, 2)
    train, held = split_held_out(w, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(torch.cat([train, held])[:, 0].tolist()) == list(range(0, 40, 2))
    assert torch.equal(split_held_out(w, 0.25, seed=3)[1], held)


def test_bad_data_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        load_documents([])
    with pytest.raises(InvalidRequestError, match="not a file"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidRequestError, match="not UTF-8 text"):
        load_documents(tmp_path / "latin1.txt")
    with pytest.raises(InvalidRequestError, match="less than one window"):
        pack_windows([[1, 2]], seq_len=8)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        pack_windows(["text"], seq_len=2)
