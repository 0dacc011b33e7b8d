"""Training data: texts or token-id lists turned into fixed-length windows, and a held-out split.

Documents are tokenised with the model's tokenizer (ids given as lists are taken as they are), joined
with EOS between them, and cut into `seq_len` windows (the tail shorter than a window is dropped):
every window is a full training row, as `PipelineTrainer.step` takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.errors import InvalidRequestError

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer


def load_documents(data: str | Path | Sequence[str | Sequence[int]]) -> list[str | list[int]]:
    """A text file (one document, its paragraphs split on blank lines), or a list of texts / id lists."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise InvalidRequestError(f"training data {str(path)!r} is not a file: give a text file or a list")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(f"training data {str(path)!r} is not UTF-8 text (byte {e.start}): "
                                      "save it as UTF-8") from None
        docs: list[str | list[int]] = [p.strip() for p in text.split("\n\n") if p.strip()]
    else:
        docs = [d if isinstance(d, str) else [int(t) for t in d] for d in data]
    if not docs:
        raise InvalidRequestError("the training data is empty: give at least one non-empty text or id list")
    return docs


def pack_windows(docs: Sequence[str | Sequence[int]], seq_len: int, tokenizer: Tokenizer | None = None,
                 eos_id: int | None = None) -> torch.Tensor:
    """[windows, seq_len] token ids: the documents' tokens end to end (EOS between them), cut in windows."""
    if seq_len < 2:
        raise InvalidRequestError(f"seq_len={seq_len}: a window needs at least 2 tokens")
    ids: list[int] = []
    for doc in docs:
        if isinstance(doc, str):
            if tokenizer is None:
                raise InvalidRequestError("text data needs the model's tokenizer: give token-id lists instead")
            ids += tokenizer.encode(doc)
        else:
            ids += list(doc)
        if eos_id is not None:
            ids.append(eos_id)
    n = len(ids) // seq_len
    if n == 0:
        raise InvalidRequestError(f"the data holds {len(ids)} tokens, less than one window of seq_len={seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def split_held_out(windows: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) windows: a seeded shuffle, at least one window held out when there are two."""
    if not 0 <= fraction < 1:
        raise InvalidRequestError(f"held-out fraction {fraction} must be in [0, 1)")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    k = min(len(windows) - 1, max(1 if fraction > 0 and len(windows) > 1 else 0, round(fraction * len(windows))))
    return windows[order[k:]], windows[order[:k]]
