"""An autoscaling Ray cluster on one machine (Ray's fake multinode provider), run in its own process.

`python -m tests.integration.autoscaling_cluster CHECKPOINT [--port N]` starts a head with
`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` (GPU worker nodes from 0, launched
by Ray's autoscaler as processes on this machine), deploys 2 stages with `autoscaling=`, makes
stage 1 the bottleneck (emulated compute time), applies a load step, and measures: seconds from
the load step to the new replica serving, throughput before and after, nodes before / at peak /
after the load, and whether every request came back identical. Prints one JSON line; exits
non-zero on any failed check. It ends only the processes it started (its head's process group).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

from tests.support import load_step, token_rate

PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(3 + i % 5)] for i in range(80)]
NEW = 30

# Ray's fake multinode provider: worker "nodes" are raylets on this machine (Ray 2.60).
FAKE_CLUSTER = {
    "cluster_name": "meshpipe-fake",
    "max_workers": 4,
    "idle_timeout_minutes": 0.2,  # an idle worker node goes after ~12 s
    "upscaling_speed": 1.0,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
        "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                           "max_workers": 4},
    },
    "head_node_type": "ray.head.default",
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def start_head(tmp: Path, port: int) -> subprocess.Popen:
    config = tmp / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(FAKE_CLUSTER))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        ["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--block",
         f"--autoscaling-config={config}", "--include-dashboard=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp / "head.log").open("w"), start_new_session=True)


def stop_head(head: subprocess.Popen, port: int) -> None:
    """Ends the head and everything it started (its process group): SIGTERM, then SIGKILL; then removes
    the `ray_current_cluster` pointer it left, so a later plain `ray.init()` does not try to join it."""
    _stop_group(head)
    pointer = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if pointer.exists() and pointer.read_text().strip().endswith(f":{port}"):
        pointer.unlink()


def _stop_group(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=15)
            if sig == signal.SIGTERM:
                time.sleep(1)  # let children the autoscaler launched go too
        except subprocess.TimeoutExpired:
            continue


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0)


def main(ckpt: str, port: int) -> dict:
    from actors import Pipeline

    tmp = Path(tempfile.mkdtemp(prefix="meshpipe-fake-"))
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: the driver connects by address
    head = start_head(tmp, port)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except Exception:  # noqa: BLE001 - the head is still starting
                if time.monotonic() > end or head.poll() is not None:
                    raise RuntimeError(f"the fake cluster's head did not start: {(tmp / 'head.log').read_text()[-2000:]}")
                time.sleep(1)
        nodes_at_start = gpu_nodes()
        t0 = time.monotonic()
        pipe = Pipeline.deploy(ckpt, num_stages=2, dtype="float64", name="fake-autoscale", micro_batches=1,
                               stage_resources={"num_gpus": 1, "num_cpus": 0}, ready_timeout_s=120,
                               autoscaling={"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0,
                                            "downscale_delay_s": 3.0, "period_s": 0.25})
        deploy_s = time.monotonic() - t0
        try:
            reference = [pipe.generate(p, max_new_tokens=NEW, ignore_eos=True)[0].token_ids for p in PROMPTS[:4]]
            nodes_before = gpu_nodes()
            pipe.set_step_time(1, 0.0, per_token=0.01)  # stage 1: compute-bound, the bottleneck
            peak = [nodes_before]
            outs, samples, load_step_at = load_step(pipe, PROMPTS, NEW,
                                                    on_sample=lambda: peak.__setitem__(0, max(peak[0], gpu_nodes())))
            assert len(outs) == len(PROMPTS), "requests lost"
            assert [outs[i] for i in range(4)] == reference, "tokens changed under load"
            ups = [d for d in pipe.autoscaler_decisions() if d["delta"] > 0]
            assert ups and ups[0]["stage"] == 1, pipe.autoscaler_decisions()
            serving = ups[0]["at"]

            before = token_rate(samples, load_step_at + 0.5, serving - ups[0]["seconds"])  # until the decision
            after = token_rate(samples, serving + 0.5, samples[-1][0] - 1.0)  # the new replica serving until the load ends
            end = time.monotonic() + 90
            while time.monotonic() < end and (gpu_nodes() > nodes_before
                                              or [len(s) for s in pipe.stats()["router"]["replicas"]] != [1, 1]):
                time.sleep(1)
            return {
                "deploy_s": round(deploy_s, 2), "gpu_nodes_at_start": nodes_at_start, "gpu_nodes_before": nodes_before,
                "gpu_nodes_peak": peak[0], "gpu_nodes_after": gpu_nodes(),
                "replicas_after": [len(s) for s in pipe.stats()["router"]["replicas"]],
                "load_step_to_serving_s": round(serving - load_step_at, 2),
                "load_step_to_decision_s": round(serving - ups[0]["seconds"] - load_step_at, 2),
                "add_replica_s": ups[0]["seconds"],
                "tokens_per_s_before": round(before, 1), "tokens_per_s_after": round(after, 1),
                "decisions": [(d["stage"], d["delta"]) for d in pipe.autoscaler_decisions()],
                "lost": len(PROMPTS) - len(outs), "identical": True,
            }
        finally:
            pipe.shutdown()
    finally:
        ray.shutdown()
        stop_head(head, port)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    port = int(sys.argv[sys.argv.index("--port") + 1]) if "--port" in sys.argv else 6379
    print(json.dumps(main(sys.argv[1], port)), flush=True)
