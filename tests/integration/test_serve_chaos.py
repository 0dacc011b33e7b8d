"""Clients that leave mid-stream while stages are killed: every answer that completes is the greedy
one, and once they are all gone no stage holds any request's cache (a leak there is memory lost for
good: a cancel or finish whose free was lost in a recovery or a broken ring)."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from actors import Pipeline
from actors import serve as http
from models import load_model
from tests.checkpoints import TINY_CHAT_TEMPLATE, make_tiny_gguf, make_tiny_llama
from tests.support import free_port, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")

NAME = "storm"
PROMPTS = ["alpha", "beta", "gamma"]


def _client(url: str, seed: int, want: dict[str, str], out: list) -> None:
    """Six streams; half of them left after a random number of lines. A stream cut by the server is
    "cut" (the test allows it only when Ray's Serve replica itself crashed)."""
    rnd = random.Random(seed)
    for _ in range(6):
        prompt, leave = rnd.choice(PROMPTS), rnd.random() < 0.5
        try:
            _stream(url, prompt, leave, rnd, want, out)
        except httpx.TransportError:
            out.append("cut")


def _stream(url: str, prompt: str, leave: bool, rnd: random.Random, want: dict[str, str], out: list) -> None:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
    text = ""
    with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if leave and rnd.random() < 0.15:
                out.append("left")
                break
            if line == "data: [DONE]":
                out.append("same" if text == want[prompt] else f"differs: {text!r} for {prompt!r}")
                break
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0].get("text") or ""


def _dead_serve_replicas() -> set[str]:
    """Ray Serve replica actors that died (a crash, or a shutdown's), from the GCS."""
    from ray._private.state import actors

    return {a for a, info in actors().items() if "ServeReplica" in info["ActorClassName"] and info["State"] == "DEAD"}


def test_clients_leaving_while_stages_die_leave_no_cache_behind(tmp_path: Path) -> None:
    gguf = make_tiny_gguf(tmp_path / "t.gguf", make_tiny_llama(tmp_path / "hf", n_layers=4),
                          chat_template=TINY_CHAT_TEMPLATE)
    want = {p: c.text for p, c in zip(PROMPTS, load_model(gguf, dtype="float64").generate(PROMPTS, max_new_tokens=40))}
    pipe = Pipeline.deploy(str(gguf), num_stages=2, dtype="float64", name=NAME, max_active_sequences=8,
                           max_queued=64, max_restarts=5)
    try:
        url = http.start([NAME], port=free_port())
        dead_before = _dead_serve_replicas()
        pipe.set_step_time(1, 0.05)
        out: list[str] = []
        clients = [threading.Thread(target=_client, args=(url, k, want, out)) for k in range(10)]
        for t in clients:
            t.start()
        for stage, at in ((1, 3.0), (0, 2.0)):  # one stage, then the other, mid-traffic
            time.sleep(at)
            ray.kill(ray.get_actor(f"meshpipe/{NAME}/stage-{stage}/replica-0", namespace="meshpipe"),
                     no_restart=False)
        for t in clients:
            t.join(timeout=120)
        assert len(out) == 60 and out.count("left") >= 10 and set(out) <= {"left", "same", "cut"}, out
        if "cut" in out:  # only Ray crashing the Serve replica (Ray 2.60, under cancels: `task_index_ == 0`)
            assert _dead_serve_replicas() - dead_before, f"streams cut with no Serve replica crash: {out}"
        held = lambda: [s.get("sequences") for s in pipe.stats()["stages"]]  # noqa: E731
        wait_for(lambda: held() == [0, 0], 30, "every stage to free every request's cache")
        assert pipe.stats()["router"]["recoveries_total"] >= 1
    finally:
        serve.shutdown()
        pipe.shutdown()
