"""meshpipe's metrics reach Ray's Prometheus export as `ray_meshpipe_*`, tagged by deployment and stage."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from actors import Pipeline

pytestmark = pytest.mark.usefixtures("ray_cluster")

WANTED = ["ray_meshpipe_tokens_generated", "ray_meshpipe_requests", "ray_meshpipe_active_sequences",
          "ray_meshpipe_stage_step_latency_ms", "ray_meshpipe_hop_bytes", "ray_meshpipe_codec_ratio",
          "ray_meshpipe_hop_latency_ms", "ray_meshpipe_stage_queue_length", "ray_meshpipe_pipeline_efficiency",
          "ray_meshpipe_stage_restarts"]


def _scrape() -> str:
    text = ""
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                text += r.read().decode()
    return text


def test_a_generation_shows_up_in_rays_metrics_export_with_stage_tags(tiny_ckpt: Path) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="metrics", micro_batches=1)
    try:
        pipe.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, ignore_eos=True)
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = _scrape()
            if all(w in text for w in WANTED) and 'deployment="metrics"' in text:
                break
            time.sleep(1)
        missing = [w for w in WANTED if w not in text]
        assert not missing, missing
        tokens = [float(m) for m in re.findall(
            r'^ray_meshpipe_tokens_generated_total\{[^}]*deployment="metrics"[^}]*\} ([0-9.e+]+)', text, re.M)]
        assert tokens and max(tokens) >= 16  # 2 sequences x 8 tokens
        assert re.search(r'ray_meshpipe_stage_step_latency_ms_count\{[^}]*stage="1"', text)
        assert re.search(r'ray_meshpipe_hop_bytes_total\{[^}]*stage="0"', text)  # stage 0 sends on; the last samples
    finally:
        pipe.shutdown()
