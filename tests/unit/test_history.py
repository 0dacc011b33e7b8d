"""A stage's output history against a plain per-position reference: records, rebuilds, truncations,
gathers, with sequences joining, leaving and sharing steps. No Ray."""

from __future__ import annotations

import random

import pytest
import torch

from actors.history import OutputHistory
from models.errors import CacheMissError


def test_history_matches_a_per_position_reference_under_random_steps() -> None:
    rng = random.Random(0)
    hist, ref = OutputHistory(), {}  # ref: sid -> (first, [row per position])
    for step in range(400):
        live = [s for s in ref if rng.random() < 0.8]
        if rng.random() < 0.3 or not live:
            new = f"s{step}"
            ref[new] = (rng.choice([0, 16]), [])
            live.append(new)
        starts, lengths = [], []
        for sid in live:
            first, rows = ref[sid]
            end = first + len(rows)
            start = rng.randint(first, end) if rows and rng.random() < 0.1 else end  # sometimes a rebuild
            starts.append(start)
            lengths.append(rng.choice([1, 1, 1, 3]))
        y = torch.randn(sum(lengths), 4)
        sent = y.clone()
        hist.record(live, starts, lengths, y)
        y.zero_()  # the caller may reuse its tensor
        off = 0
        for sid, start, n in zip(live, starts, lengths):
            first, rows = ref[sid]
            ref[sid] = (first, rows[:start - first] + list(sent[off:off + n]))
            off += n
        for sid in [s for s in ref if rng.random() < 0.05]:
            hist.free([sid])
            del ref[sid]
        if rng.random() < 0.05 and ref:
            sid = rng.choice(list(ref))
            first, rows = ref[sid]
            cut = rng.randint(first, first + len(rows))
            hist.truncate(sid, cut)
            ref[sid] = (first, rows[:cut - first])
        for sid, (first, rows) in ref.items():
            assert hist.first(sid) == first and hist.length(sid) == first + len(rows)
            if rows:
                assert torch.equal(hist.gather([sid], [first], [len(rows)]), torch.stack(rows))


def test_a_step_is_copied_once_and_each_sequence_reads_its_own_rows() -> None:
    hist = OutputHistory()
    y = torch.arange(12.0).view(6, 2)
    hist.record(["a", "b", "c"], [0, 0, 5], [1, 3, 2], y)
    y.fill_(-1)
    assert hist.gather(["b"], [1], [2]).tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert hist.gather(["c", "a"], [5, 0], [2, 1]).tolist() == [[8.0, 9.0], [10.0, 11.0], [0.0, 1.0]]
    assert hist.first("c") == 5 and hist.length("c") == 7
    with pytest.raises(CacheMissError, match="holds positions 5..6"):
        hist.gather(["c"], [4], [1])
    with pytest.raises(CacheMissError, match="has 3 positions, a step starts at 6"):
        hist.record(["b"], [6], [1], torch.zeros(1, 2))


def test_a_long_sequence_is_never_copied_again_once_joined() -> None:
    """Rows are joined 64 at a time into blocks that later steps leave alone (joining into one growing
    tensor copied every row again at each join: O(T^2) over a long generation)."""
    hist = OutputHistory()
    for pos in range(300):
        hist.record(["a", "b"], [pos, pos], [1, 1], torch.full((2, 3), float(pos)))
    blocks = hist._blocks["a"]
    assert [b.shape[0] for b in blocks] == [64, 64, 64, 64]
    ptrs = [b.data_ptr() for b in blocks]
    for pos in range(300, 400):
        hist.record(["a"], [pos], [1], torch.full((1, 3), float(pos)))
    assert [b.data_ptr() for b in hist._blocks["a"][:4]] == ptrs
    assert hist.gather(["a"], [0], [400])[:, 0].tolist() == [float(p) for p in range(400)]
    assert hist.gather(["b"], [250], [50])[:, 0].tolist() == [float(p) for p in range(250, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_serial_clone_is_a_clone(dtype: torch.dtype) -> None:
    """The history's copy (one memcpy on this thread for CPU tensors, torch's copy otherwise): equal, apart."""
    from actors.wire.buffers import serial_clone

    for t in (torch.randn(64, 48).to(dtype), torch.randn(64, 2048).to(dtype), torch.randn(2048, 64).to(dtype).t(),
              torch.tensor(3.0).to(dtype), torch.empty(0, 4, dtype=dtype)):
        c = serial_clone(t)
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
        if t.numel():
            assert c.data_ptr() != t.data_ptr()
