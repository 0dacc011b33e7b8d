"""Ray's fake multinode autoscaler (GPU worker nodes from 0): the meshpipe autoscaler's new replica makes
Ray launch a node; when the load ends the replica drains and the node goes. Own process, own head.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(not _port_free(6379), reason="port 6379 is taken: the fake nodes look for the head there")
def test_a_load_step_launches_a_gpu_node_for_a_new_replica_and_it_goes_after(tiny_ckpt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "tests.integration.autoscaling_cluster", str(tiny_ckpt)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["gpu_nodes_at_start"] == 0 and seen["gpu_nodes_before"] == 2  # Ray launched nodes for 2 stages
    assert seen["gpu_nodes_peak"] == 3  # ... and one more for the new replica
    assert seen["gpu_nodes_after"] == 2 and seen["replicas_after"] == [1, 1]  # drained; the idle node went
    assert seen["decisions"][0] == [1, 1] and [1, -1] in seen["decisions"]
    assert seen["lost"] == 0 and seen["identical"]
    assert seen["tokens_per_s_after"] > seen["tokens_per_s_before"]
