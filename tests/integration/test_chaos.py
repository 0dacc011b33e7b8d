"""`meshpipe chaos` on the session Ray: 50 concurrent generations, 10 stage kills, nothing lost or changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.bench.chaos import run_chaos

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize(("replicas", "replicate_every"), [(1, 0), (2, 4)], ids=["restart", "spare+copies"])
def test_fifty_requests_survive_ten_kills_with_identical_tokens(tiny_ckpt: Path, replicas: int,
                                                               replicate_every: int) -> None:
    result = run_chaos(str(tiny_ckpt), requests=50, kills=10, kill_every=2, num_stages=3, replicas=replicas,
                       max_new_tokens=120, dtype="float64", name=f"chaos-{replicas}", hop_delay_s=0.04,
                       micro_batches=1, replicate_every=replicate_every)
    assert result.kills == 10, result
    assert result.lost == 0 and result.mismatches == 0, result.errors
    assert result.recoveries >= 1 and result.kill_to_resume_p50_s is not None
    assert result.tokens == 50 * 120
