"""meshpipe's metrics reach Ray's Prometheus export as `ray_meshpipe_*`, tagged by deployment and stage."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
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


def scrape_until(wanted: list[str], deployment: str, timeout: float = 60,
                 done: Callable[[str], bool] = lambda text: True) -> str:
    """Ray's export once every `wanted` series of `deployment` is in it and `done(text)` holds (or the last
    scrape at the timeout): Ray exports every few seconds, so a series may show an earlier value first."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = _scrape()
        if all(w in text for w in wanted) and f'deployment="{deployment}"' in text and done(text):
            break
        time.sleep(1)
    return text


def test_a_generation_shows_up_in_rays_metrics_export_with_stage_tags(tiny_ckpt: Path) -> None:
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="metrics", micro_batches=1)
    try:
        pipe.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, ignore_eos=True)
        text = scrape_until(WANTED, "metrics")
        missing = [w for w in WANTED if w not in text]
        assert not missing, missing
        tokens = [float(m) for m in re.findall(
            r'^ray_meshpipe_tokens_generated_total\{[^}]*deployment="metrics"[^}]*\} ([0-9.e+]+)', text, re.M)]
        assert tokens and max(tokens) >= 16  # 2 sequences x 8 tokens
        assert re.search(r'ray_meshpipe_stage_step_latency_ms_count\{[^}]*stage="1"', text)
        assert re.search(r'ray_meshpipe_hop_bytes_total\{[^}]*stage="0"', text)  # stage 0 sends on; the last samples
    finally:
        pipe.shutdown()


def test_training_steps_show_up_with_stage_and_copy_tags(tiny_ckpt: Path) -> None:
    from actors import PipelineTrainer

    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, micro_batches=2, name="metrics-train")
    try:
        steps = [tr.step([[5, 6, 7, 8, 9]] * 4) for _ in range(2)]
        wanted = ["ray_meshpipe_train_loss", "ray_meshpipe_train_tokens", "ray_meshpipe_train_step_seconds",
                  "ray_meshpipe_train_bubble_fraction"]

        def train_tokens(text: str) -> list[float]:
            return [float(m) for m in re.findall(r'^ray_meshpipe_train_tokens_total\{[^}]*copy="0"[^}]*'
                                                 r'deployment="metrics-train"[^}]*stage="1"[^}]*\} ([0-9.e+]+)',
                                                 text, re.M)]

        text = scrape_until(wanted, "metrics-train", done=lambda text: train_tokens(text) == [2 * 4 * 4])
        assert not [w for w in wanted if w not in text], text[-2000:]
        tokens = train_tokens(text)
        assert tokens == [2 * 4 * 4]  # two steps of 4 rows x 4 targets
        loss = [float(m) for m in re.findall(r'^ray_meshpipe_train_loss\{[^}]*deployment="metrics-train"[^}]*\} '
                                             r'([0-9.e+-]+)', text, re.M)]
        assert loss and all(abs(v - steps[-1].loss) < 1e-6 for v in loss)
    finally:
        tr.shutdown()
