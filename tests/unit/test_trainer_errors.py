"""Which failed training tasks the trainer recovers from (a peer died) and which it raises (a bug in the step);
which checkpoint folders `resume` refuses before deploying anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch.distributed as dist

from actors.train_checkpoint import _checkpoint_meta
from actors.trainer import _lost_peer
from models import ConfigError


def task_error(cause: Exception) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("TrainStage.backward", "Traceback ...", cause)


def test_a_dead_peer_is_recognised_by_type_or_by_gloos_text_and_a_bug_is_not() -> None:
    assert _lost_peer(task_error(dist.DistNetworkError("peer gone")))
    assert _lost_peer(task_error(ray.exceptions.OwnerDiedError("00" * 28, "", "")))
    assert _lost_peer(task_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")))
    assert not _lost_peer(task_error(ValueError("shapes (4, 64) and (32, 64) do not match")))
    assert not _lost_peer(task_error(ZeroDivisionError("division by zero")))


@pytest.mark.parametrize(("text", "problem"), [
    ("not json", "not valid JSON"),
    ("[1, 2]", "lacks source, steps or speeds"),
    ('{"source": "m", "steps": 1}', "lacks source, steps or speeds"),
    ('{"source": "m", "steps": 1, "speeds": null, "bogus": 1}', "deploy does not take: \\['bogus'\\]"),
    ('{"source": "m", "steps": "1", "speeds": null}', "steps must be an int"),
    ('{"source": "m", "steps": 1, "speeds": null, "data": []}', "data an object"),
    (" " * (1 << 20) + "{}", "over 1 MiB"),
])
def test_a_malformed_checkpoint_is_refused_before_anything_deploys(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "trainer.json").write_text(text)
    with pytest.raises(ConfigError, match=problem):
        _checkpoint_meta(tmp_path, {"source", "num_stages", "name"})


def test_a_checkpoint_save_wrote_passes(tmp_path: Path) -> None:
    (tmp_path / "trainer.json").write_text('{"source": "m", "num_stages": 2, "steps": 3, "speeds": null, "data": {}}')
    assert _checkpoint_meta(tmp_path, {"source", "num_stages"})["steps"] == 3
