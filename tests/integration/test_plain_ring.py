"""`bench pipeline --plain`'s reference: the same stages as plain processes over OS pipes (no Ray).

It is a pipeline's bound only if it computes what the pipeline computes: the layers split as a
deployment splits them, and greedy tokens equal to the one-process model's, at 2 and 3 stages and
several sequences; its processes start with the stages'
OpenMP spin and end when it closes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.bench.plain import PlainRing, plain_row
from actors.layout import partition
from models import generate_local, load_model
from models.loading import read_config

PROMPT = [5, 17, 42, 99, 3]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


@pytest.mark.parametrize("stages", [2, 3])
def test_plain_stages_give_the_one_process_tokens(tiny_ckpt: Path, stages: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    want = generate_local(load_model(tiny_ckpt, dtype="float32"), PROMPT, 12, ignore_eos=True)[0].token_ids
    ring = PlainRing(str(tiny_ckpt), stages, threads=1)
    try:
        assert len(ring.procs) == stages
        assert ring.layers == [list(s.layers) for s in partition(read_config(tiny_ckpt), num_stages=stages)]
        assert all(_environ(p.pid).get("GOMP_SPINCOUNT") == "50000" for p in ring.procs)
        seconds, out = ring.run(PROMPT, 3, 12)
        assert seconds > 0 and out == [want] * 3
        row = plain_row(ring, PROMPT, 2, 12, repeats=2, reference=want)
        assert row["bench"] == "plain_processes" and row["stages"] == stages and row["batch"] == 2
        assert row["same_tokens_as_one_process"] is True and row["threads_per_stage"] == 1
        assert row["tokens_per_s"] == pytest.approx(2 * 12 / (row["ms_per_step"] * 12 / 1e3))
        assert plain_row(ring, PROMPT, 1, 12, 1, reference=[0] * 12)["same_tokens_as_one_process"] is False
    finally:
        ring.close()
    assert all(p.returncode == 0 for p in ring.procs)  # "stop" went round the ring: each exited on its own


def test_a_ring_the_model_cannot_make_is_refused_by_name(tiny_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="4 layers cannot make 5 stages"):
        PlainRing(str(tiny_ckpt), 5)
    with pytest.raises(ValueError, match="at least 2 stages"):
        PlainRing(str(tiny_ckpt), 1)
