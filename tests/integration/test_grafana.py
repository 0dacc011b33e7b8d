"""Every series the shipped Grafana dashboards query is one Ray really exports for a meshpipe run.

One serving deployment goes through what each panel shows: generations, a prefix hit, speculative
decoding, a corrupted message (retransmit), a stage replica killed mid-generation (reroute, recovery)
and the autoscaler replacing it (a decision); a trainer takes two steps. Then Ray's Prometheus export
must hold every series the panels and variables name, tagged with these deployments.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import ray

from actors import Pipeline
from actors.grafana import (
    DASHBOARDS,
    grafana_command,
    load,
    panel_series,
    ray_dashboards_dir,
    variable_series,
)
from tests.checkpoints import make_tiny_llama
from tests.integration.test_metrics import _scrape
from tests.support import wait_for
from tests.unit.test_grafana import exported_series

pytestmark = pytest.mark.usefixtures("ray_cluster")

SERVE, TRAIN = "grafana-serve", "grafana-train"
SYSTEM = [(7 * i) % 250 + 3 for i in range(40)]  # a shared prompt prefix: five 8-token blocks
PHRASE = [5, 17, 42, 99, 3]
PROMPTS = [[5, 17, 42, 99, 3], [11, 12], list(range(30, 51)), [200], [9] * 13]


@pytest.fixture(scope="module")
def loopy_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small weights: greedy output falls into cycles, so speculative (prompt-lookup) drafts get accepted
    and `meshpipe_speculative_accepted` is exported (a counter never incremented is not)."""
    return make_tiny_llama(tmp_path_factory.mktemp("grafana") / "llama", n_layers=2, init=0.02)


def _wanted() -> set[str]:
    return set().union(*(panel_series(load(p)) | variable_series(load(p)) for p in DASHBOARDS))


def _exported(text: str, series: str) -> bool:
    return re.search(rf'^{series}\{{[^}}]*deployment="(?:{SERVE}|{TRAIN})"', text, re.MULTILINE) is not None


def _serve_every_event(pipe: Pipeline) -> None:
    pipe.generate([SYSTEM + [11, 12, 13]], max_new_tokens=6, ignore_eos=True)
    pipe.generate([SYSTEM + [21, 22]], max_new_tokens=6, ignore_eos=True)  # starts on the cached blocks
    spec = pipe.generate([PHRASE * 4], max_new_tokens=30, ignore_eos=True, speculative=4)
    assert spec[0].speculation["accepted"] > 0
    pipe.inject_fault(0, "corrupt", 1)  # stage 0 -> stage 1: one flipped byte, resent
    pipe.generate(PROMPTS[:2], max_new_tokens=6, ignore_eos=True)
    wait_for(lambda: pipe.stats()["router"]["retransmits"] >= 1, what="the resend counted")  # on a pass, or on
    # the previous generation's release-only message (its tail reports that on its own)

    pipe.set_hop_delay(0, 0.05)  # the kill lands mid-generation
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(outs=pipe.generate(PROMPTS, max_new_tokens=20,
                                                                         ignore_eos=True)))
    t.start()
    time.sleep(0.5)
    # and once a stage-1 replica holds sequences (a loaded machine may not have admitted them yet)
    wait_for(lambda: any(rep["sequences"] for rep in pipe.stats()["router"]["replicas"][1]), 30,
             "a busy stage-1 replica")
    busy = [r for r, rep in enumerate(pipe.stats()["router"]["replicas"][1]) if rep["sequences"]]
    ray.kill(ray.get_actor(f"meshpipe/{SERVE}/stage-1/replica-{busy[0]}", namespace="meshpipe"))
    t.join(timeout=120)
    assert len(result["outs"]) == len(PROMPTS)  # rerouted to the other replica, none lost
    pipe.set_hop_delay(0, 0.0)
    # below min_replicas now: the autoscaler starts a replacement (an "up" decision)
    wait_for(lambda: any(d["delta"] > 0 for d in pipe.autoscaler_decisions()), timeout=60,
             what="the autoscaler's replacement replica")


def test_every_series_the_dashboards_query_is_exported(loopy_ckpt: Path, tiny_ckpt: Path) -> None:
    from actors import PipelineTrainer

    wanted = _wanted()
    assert wanted <= set(exported_series())  # the unit test's check, again
    pipe = Pipeline.deploy(str(loopy_ckpt), num_stages=2, replicas_per_stage=2, dtype="float64", name=SERVE,
                           micro_batches=1, kv_block_size=8, max_restarts=0,
                           autoscaling={"min_replicas": 2, "max_replicas": 2, "period_s": 0.25})
    try:
        _serve_every_event(pipe)
        tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, micro_batches=2, name=TRAIN)
        try:
            for _ in range(2):
                tr.step([[5, 6, 7, 8, 9]] * 4)
            deadline = time.monotonic() + 60
            missing = sorted(wanted)
            while time.monotonic() < deadline and missing:
                text = _scrape()
                missing = [s for s in missing if not _exported(text, s)]
                if missing:
                    time.sleep(1)
            assert not missing, missing
        finally:
            tr.shutdown()
    finally:
        pipe.shutdown()


def test_ray_dir_is_this_sessions_grafana_dashboards_folder() -> None:
    ctx = ray.get_runtime_context()
    folder = ray_dashboards_dir()
    assert folder == Path(ctx.get_temp_dir()) / ctx.get_session_name() / "metrics" / "grafana" / "dashboards"
    text = grafana_command(None, ray_dir=True)
    try:
        assert str(folder) in text
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in DASHBOARDS)
    finally:
        for p in DASHBOARDS:
            (folder / p.name).unlink(missing_ok=True)
