"""Deploy progress drawn as tqdm bars (what the CLI and the notebook show)."""

from __future__ import annotations

import io

from actors.progress import DeployProgress, TqdmProgress


def test_one_bar_per_phase_filled_to_its_total_then_closed() -> None:
    out = io.StringIO()
    bars = TqdmProgress(file=out, mininterval=0)
    for p in [DeployProgress("weights", 0, 2), DeployProgress("stages", 0, 3), DeployProgress("weights", 2, 2),
              DeployProgress("stages", 1, 3), DeployProgress("stages", 3, 3)]:
        bars(p)
    assert set(bars.bars) == {"weights", "stages"}
    assert [b.n for b in bars.bars.values()] == [2, 3]
    assert all(b.disable or b.n == b.total for b in bars.bars.values())
    text = out.getvalue()
    assert "reading weights" in text and "2/2" in text
    assert "starting stages" in text and "3/3" in text
    bars.close()  # closing twice is harmless
