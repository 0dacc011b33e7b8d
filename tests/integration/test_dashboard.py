"""The live page in a real headless Chromium (Debian's `chromium`, driven over DevTools): after its
scripts ran, the DOM shows every stage replica's actor name, a tokens/s figure and the route drawing;
a stage killed mid-generation shows up as a recovery within the page's refresh period. Also the status
JSON against its schema, served by `meshpipe watch`'s app on the session's Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from actors import Pipeline
from actors.dashboard.status import PipelineStatus
from tests.browser import Browser, chromium

pytestmark = pytest.mark.usefixtures("ray_cluster")


@contextmanager
def watch_server(names: list[str]) -> Iterator[str]:
    """`meshpipe watch`'s app on uvicorn in a thread of this process (attached to the session's Ray)."""
    import uvicorn

    from actors.dashboard.watch import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(names), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def generating(pipe: Pipeline) -> Iterator[None]:
    """Requests keep decoding in the background (tokens/s above zero; a kill lands mid-generation)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            pipe.generate([[1, 2, 3], [4, 5]], max_new_tokens=24, ignore_eos=True)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(120)


def test_the_page_shows_replicas_throughput_the_route_and_a_recovery_in_a_real_browser(tiny_ckpt: Path,
                                                                                       tmp_path: Path) -> None:
    if chromium() is None:
        pytest.skip("no chromium (.ci/run installs Debian's)")
    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, replicas_per_stage=2, dtype="float64", name="dash",
                           micro_batches=1)
    names = [n for stage in pipe.describe()["replicas"] for n in stage]
    assert len(names) == 4
    try:
        with watch_server(["dash"]) as url, generating(pipe):
            browser = Browser(f"{url}/dashboard")
            try:
                text = browser.wait_for(
                    f"(() => {{ const t = document.body.innerText; return {json.dumps(names)}.every(n => t.includes(n))"
                    " && t; })()", 30, "every replica's actor name")
                figure = browser.wait_for(
                    "(() => { const t = document.getElementById('tokens-per-s').textContent;"
                    " return /^[0-9.]+ tokens\\/s$/.test(t) && parseFloat(t) > 0 && t; })()", 30, "a tokens/s figure")
                drawn = browser.evaluate("[document.querySelectorAll('#route-graph .replica').length,"
                                         " document.querySelectorAll('#route-graph .edge.route').length,"
                                         " [...document.querySelectorAll('#route-graph .replica')]"
                                         ".map(g => g.dataset.name)]")
                assert drawn[0] == 4 and drawn[1] == 3 and sorted(drawn[2]) == sorted(names), drawn  # start, 2 hops, end
                assert "stage-0/replica-0" in text and float(figure.split()[0]) > 0

                victim = names[2]  # stage 1, replica 0: Ray restarts it; the router recovers its sequences
                ray.kill(ray.get_actor(victim, namespace="meshpipe"), no_restart=False)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # the router's own record of the restart first
                    st = pipe.stats()["stages"]
                    if any(s.get("stage") == 1 and s.get("replica") == 0 and s.get("restarts", 0) >= 1 for s in st):
                        break
                    time.sleep(0.2)
                seen = time.monotonic()
                shown = browser.wait_for(
                    "(() => { const t = document.getElementById('events').innerText;"
                    " return (t.includes('restart') || t.includes('recover')) && t; })()", 5,
                    "the restart or recovery")
                lag = time.monotonic() - seen
                assert "stage-1/replica-0" in shown or "recovered" in shown, shown
                assert lag <= 3.0, f"the page showed it {lag:.1f} s after the router knew (refresh 1 s)"
                shot = tmp_path / "dashboard.png"
                browser.screenshot(shot)
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                if os.environ.get("MESHPIPE_SCREENSHOT"):  # README's picture is refreshed from here
                    shutil.copy(shot, os.environ["MESHPIPE_SCREENSHOT"])
            finally:
                browser.close()
    finally:
        pipe.shutdown()


def test_the_status_json_follows_its_schema_and_names_the_deployment(tiny_ckpt: Path) -> None:
    import jsonschema

    from actors import PipelineTrainer

    pipe = Pipeline.deploy(str(tiny_ckpt), num_stages=2, dtype="float64", name="dash-json", micro_batches=1)
    tr = PipelineTrainer.deploy(str(tiny_ckpt), num_stages=2, micro_batches=2, name="dash-train")
    try:
        pipe.generate([[1, 2, 3]], max_new_tokens=8, ignore_eos=True)
        losses = [tr.step([[5, 6, 7, 8, 9]] * 4).loss for _ in range(2)]
        with watch_server(["dash-json"]) as url:
            with urllib.request.urlopen(f"{url}/v1/pipeline/status", timeout=30) as r:
                body = json.load(r)
            jsonschema.validate(body, PipelineStatus.model_json_schema())
            assert body["deployment"] == "dash-json" and body["stages"] == 2
            assert [r["name"] for r in body["replicas"]] == [f"meshpipe/dash-json/stage-{k}/replica-0" for k in (0, 1)]
            assert body["route"] == [r["name"] for r in body["replicas"]] and body["mermaid"].startswith("graph LR")
            assert body["tokens_generated"] >= 8
            run = next(r for r in body["training"] if r["name"] == "dash-train")  # a trainer in the cluster
            assert run["stages"] == 2 and run["steps"] == 2 and run["tokens_per_s"] > 0
            assert [loss for _, loss in run["loss"]] == pytest.approx(losses)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{url}/v1/pipeline/status?deployment=other", timeout=30)
            assert e.value.code == 404 and "dash-json" in e.value.read().decode()
    finally:
        tr.shutdown()
        pipe.shutdown()
