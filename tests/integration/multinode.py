"""A 3-node Ray cluster on one machine (`ray.cluster_utils.Cluster`), run in its own process.

`python -m tests.integration.multinode CHECKPOINT` deploys 2 stages × 2 replicas over two GPU
nodes, checks tokens against the single-process model, waits for the probes' measured topology,
makes one replica's inbound link slow (the hop-delay hook) and checks new requests avoid it,
then removes the node of a stage pinned by `topology=` mid-generation and checks it is placed anew.
Prints one JSON line of what it saw; exits non-zero on any failed check.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import ray
from ray.cluster_utils import Cluster

from actors import Pipeline
from models import load_model
from tests.support import wait_for

PROMPTS = [[5, 17, 42, 99, 3], [11, 12], list(range(30, 51)), [200], [9] * 13, [1, 2, 3]]


def main(ckpt: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                            "_system_config": HEALTH_CHECKS})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=2, resources={host: 1}) for host in ("gpu-a", "gpu-b")]
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        ref = load_model(ckpt, dtype="float64").generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        pipe = Pipeline.deploy(ckpt, num_stages=2, replicas_per_stage=2, dtype="float64", name="multinode",
                               micro_batches=1)
        try:
            info = pipe.describe()
            nodes = [[s["node_id"] for s in info["stages"] if s["stage"] == k] for k in range(2)]
            worker_ids = {w.node_id for w in workers}
            assert all(set(n) <= worker_ids for n in nodes), nodes  # GPU actors on the GPU nodes
            assert all(len(set(n)) == 2 for n in nodes), f"replicas of a stage share a node: {nodes}"

            outs = pipe.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
            assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
            spread = sorted({n for o in outs for n in o.route})

            wait_for(lambda: pipe.describe()["topology"] is not None, 60, "the measured topology")
            topo = pipe.describe()["topology"]
            links = [(lk["a"][:8], lk["b"][:8], lk["latency_ms"], lk["bandwidth_gbps"]) for lk in topo["links"]]
            hosts = {*worker_ids, info["router_node"]}
            assert set(topo["nodes"]) == hosts, topo  # the router's node and the stages' nodes
            assert len(links) == len(hosts) * (len(hosts) - 1), topo  # every ordered pair measured

            pipe.set_hop_delay(1, 0.3, replica=0)

            def slow_noticed() -> bool:  # 300 ms probes into a moving average: 90, 153, 197, 228 ms...
                return pipe.stats()["router"]["replicas"][1][0]["inbound_ms"] > 200

            wait_for(slow_noticed, 30, "the router to notice the slow replica")
            before = pipe.stats()["router"]["replicas"][1][0]["served"]
            outs2 = pipe.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
            assert [o.token_ids for o in outs2] == [o.token_ids for o in ref]
            routes2 = sorted({n for o in outs2 for n in o.route})
            assert all(o.route[1].endswith("stage-1/replica-1") for o in outs2), (routes2, pipe.stats()["router"]["replicas"])
            assert pipe.stats()["router"]["replicas"][1][0]["served"] == before
        finally:
            pipe.shutdown()
        placed = placed_by_topology(ckpt, ref, {w.node_id: host for w, host in zip(workers, ("gpu-a", "gpu-b"))})
        lost = node_loss(ckpt, cluster, workers)
        return {"node_loss": lost, "nodes": len(ray.nodes()), "stage_nodes": [[n[:8] for n in ns] for ns in nodes],
                "replicas_used_before": spread, "replicas_used_after_slow_link": routes2,
                "measured_links": links, "identical": True, "placed": placed}
    finally:
        ray.shutdown()
        cluster.shutdown()


# Node death is noticed after period x threshold: ~1 s here instead of Ray's default ~15 s (measured).
HEALTH_CHECKS = {"health_check_period_ms": 200, "health_check_failure_threshold": 5}


def node_loss(ckpt: str, cluster: Cluster, workers: list) -> dict:
    """The node of a stage placed by `topology=` (hard affinity) dies mid-generation: the router places
    the stage anew on a node with a free GPU, rebuilds its caches, and every request ends identical."""
    spare = cluster.add_node(num_cpus=1, num_gpus=1, resources={"gpu-c": 1})
    cluster.wait_for_nodes()
    ref = load_model(ckpt, dtype="float64").generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    pipe = Pipeline.deploy(ckpt, num_stages=2, topology=TOPOLOGY, dtype="float64", name="nodeloss", micro_batches=1)
    try:
        before = {s["stage"]: s["node_id"] for s in pipe.describe()["stages"]}
        victim = next(w for w in workers if w.node_id == before[1])
        assert before[0] != before[1], before
        pipe.set_hop_delay(0, 0.1)  # 20 passes take > 2 s: the node dies mid-generation, however loaded
        rids = [pipe.submit(p, max_new_tokens=20, ignore_eos=True) for p in PROMPTS]
        deadline = time.monotonic() + 30
        while pipe.stats()["router"]["tokens_generated"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)
        outs = [pipe.result(r, timeout=120) for r in rids]
        took = time.monotonic() - t0
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        after = {s["stage"]: s["node_id"] for s in pipe.describe()["stages"]}
        stats = pipe.stats()["router"]
        # a node with a free GPU; the one hosting stage 0 first (gpu-b has two GPUs): its link is free
        assert after[1] != before[1] and after[1] in (before[0], spare.node_id), (before, after)
        assert stats["replacements"] == 1, stats
        return {"moved_to_spare": True, "next_to_stage_0": after[1] == before[0], "seconds_to_finish": round(took, 2), "recoveries_s": stats["recoveries_s"]}
    finally:
        pipe.shutdown()


TOPOLOGY = {
    "nodes": {"gpu-a": {"gpus": 1, "tflops": 40}, "gpu-b": {"gpus": 2, "tflops": 10}},
    "links": [{"a": "gpu-a", "b": "gpu-b", "latency_ms": 1, "bandwidth_gbps": 10}],
}


def placed_by_topology(ckpt: str, ref: list, host_of: dict[str, str]) -> list[dict]:
    """`topology=`: the DP puts more layers on the 4x faster host; actors land on the hosts it chose."""
    pipe = Pipeline.deploy(ckpt, num_stages=2, topology=TOPOLOGY, dtype="float64", name="placed")
    try:
        stages = pipe.describe()["stages"]
        placed = [{"stage": s["stage"], "layers": s["layers"], "host": host_of[s["node_id"]]} for s in stages]
        work = {p["host"]: p["layers"][1] - p["layers"][0] + 1 for p in placed}
        assert work["gpu-a"] > work["gpu-b"], placed
        outs = pipe.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        return placed
    finally:
        pipe.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(main(sys.argv[1])), flush=True)
