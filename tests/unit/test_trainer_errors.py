"""Which failed training tasks the trainer recovers from (a peer died) and which it raises (a bug in the step)."""

from __future__ import annotations

import ray
import torch.distributed as dist

from actors.trainer import _lost_peer


def task_error(cause: Exception) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("TrainStage.backward", "Traceback ...", cause)


def test_a_dead_peer_is_recognised_by_type_or_by_gloos_text_and_a_bug_is_not() -> None:
    assert _lost_peer(task_error(dist.DistNetworkError("peer gone")))
    assert _lost_peer(task_error(ray.exceptions.OwnerDiedError("00" * 28, "", "")))
    assert _lost_peer(task_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")))
    assert not _lost_peer(task_error(ValueError("shapes (4, 64) and (32, 64) do not match")))
    assert not _lost_peer(task_error(ZeroDivisionError("division by zero")))
