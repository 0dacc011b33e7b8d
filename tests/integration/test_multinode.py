"""Several Ray nodes on one machine: replicas on different nodes, measured links, slow link avoided.

The cluster runs in its own process (`tests/integration/multinode.py`), away from the session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_three_nodes_two_replicas_a_slow_link_is_avoided_and_tokens_stay_identical(tiny_ckpt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "tests.integration.multinode", str(tiny_ckpt)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == 4 and seen["identical"]  # 3, then a spare for the node-loss check
    assert len(seen["replicas_used_before"]) == 4  # both replicas of both stages served
    assert not any(n.endswith("stage-1/replica-0") for n in seen["replicas_used_after_slow_link"])
    assert len(seen["measured_links"]) >= 2 and all(bw > 0 for *_, bw in seen["measured_links"])
    assert {p["host"] for p in seen["placed"]} == {"gpu-a", "gpu-b"}  # topology= placed a stage on each host
    assert seen["node_loss"]["moved_to_spare"]  # a lost node's stage was placed anew, tokens identical
