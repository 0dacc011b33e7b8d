"""`meshpipe serve` over real HTTP: Ray Serve in the session Ray, the `openai` client and httpx.

The served deployment is a tiny random GGUF (byte-level tokenizer, a ChatML-like template) in two
float64 stages; every greedy answer is compared with the single-process model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from actors import Pipeline
from actors import serve as http
from models import load_model
from tests.checkpoints import TINY_CHAT_TEMPLATE, make_tiny_gguf, make_tiny_llama
from tests.support import free_port, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")

NAME = "http-tiny"
MAX_ACTIVE, MAX_QUEUED = 4, 4  # a request of more than 8 choices is refused at once (429)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("http")
    return make_tiny_gguf(folder / "tiny-chat.gguf", make_tiny_llama(folder / "hf", n_layers=4),
                          chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def ref(gguf: Path):  # noqa: ANN201
    return load_model(gguf, dtype="float64")


@pytest.fixture(scope="module")
def server(gguf: Path):  # noqa: ANN201
    pipe = Pipeline.deploy(str(gguf), num_stages=2, dtype="float64", name=NAME, max_active_sequences=MAX_ACTIVE,
                           max_queued=MAX_QUEUED)
    url = http.start([NAME], port=free_port())
    yield {"url": url, "pipe": pipe}
    serve.shutdown()
    pipe.shutdown()


@pytest.fixture
def client(server: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"], api_key="unused", max_retries=0, timeout=60)


def _idle(pipe: Pipeline) -> bool:
    stats = pipe.stats()
    return stats["router"]["active"] == 0 and all(s["sequences"] == 0 for s in stats["stages"])


def test_models_lists_the_deployment(client: openai.OpenAI, gguf: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].owned_by == "meshpipe"
    assert models[0].model_extra["root"] == gguf.name
    assert models[0].model_extra["max_model_len"] == 256


def test_completion_is_the_single_process_models_greedy_answer(client: openai.OpenAI, ref) -> None:  # noqa: ANN001
    want = ref.generate("hello", max_new_tokens=12, logprobs=2)[0]
    got = client.completions.create(model=NAME, prompt="hello", max_tokens=12, temperature=0, logprobs=2)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    (c,) = got.choices
    assert c.text == want.text
    assert c.finish_reason == want.finish_reason == "length"
    assert got.usage.prompt_tokens == want.usage["prompt_tokens"]
    assert got.usage.completion_tokens == 12 and got.usage.total_tokens == want.usage["total_tokens"]
    tok = ref.tokenizer
    assert c.logprobs.tokens == [tok.decode([t]) for t in want.token_ids]
    assert c.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-9)
    assert [len(t) for t in c.logprobs.top_logprobs] == [len({tok.decode([i]) for i in lp.top}) for lp in want.logprobs]
    assert c.logprobs.text_offset[0] == 0


def test_token_id_prompts_several_prompts_and_seeded_choices(client: openai.OpenAI, ref) -> None:  # noqa: ANN001
    ids = [[5, 17, 42, 99], [11, 12, 13]]
    got = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [c.text for c in ref.generate(ids, max_new_tokens=6)]
    assert got.usage.prompt_tokens == 7 and got.usage.completion_tokens == sum(
        len(c.token_ids) for c in ref.generate(ids, max_new_tokens=6))
    sampled = dict(model=NAME, prompt=["hello", "bye"], max_tokens=8, temperature=1.0, seed=7, n=2)
    a, b = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: replayable
    from models import SamplingParams

    for i, c in enumerate(a.choices):  # choice j of a prompt samples with seed + j
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7 + i % 2)
        assert c.text == ref.generate(["hello", "bye"][i // 2], **vars(params))[0].text
    assert a.usage.prompt_tokens == len(ref.tokenizer.encode("hello")) + len(ref.tokenizer.encode("bye"))


def test_chat_completion_applies_the_template(client: openai.OpenAI, ref) -> None:  # noqa: ANN001
    prompt = ref.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    want = ref.generate(prompt, max_new_tokens=10, logprobs=1)[0]
    got = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=1)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    (c,) = got.choices
    assert c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == "length"
    assert got.usage.prompt_tokens == len(ref.tokenizer.encode(prompt))
    assert [e.logprob for e in c.logprobs.content] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-9)
    assert all(len(e.top_logprobs) == 1 for e in c.logprobs.content)
    assert c.logprobs.content[0].bytes == list(c.logprobs.content[0].token.encode())


def test_streams_carry_the_same_text_then_finish_reason_and_usage(client: openai.OpenAI, ref) -> None:  # noqa: ANN001
    want = ref.generate("stream me", max_new_tokens=16)[0]
    chunks = list(client.completions.create(model=NAME, prompt="stream me", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert len(chunks) >= 4  # streamed, not one lump
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16

    prompt = ref.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    want = ref.generate(prompt, max_new_tokens=12)[0]
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_logprobs_and_usage_read_as_the_unstreamed_answer(server: dict) -> None:
    """text_offset counts the tokens' text (text held back for stop strings is not yet sent), and with
    include_usage every chunk but the last carries "usage": null, as OpenAI's do."""
    body = {"model": NAME, "prompt": "offsets", "max_tokens": 12, "temperature": 0, "logprobs": 1}
    whole = httpx.post(server["url"] + "/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    chunks = []
    with httpx.stream("POST", server["url"] + "/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [o for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == whole["text_offset"] and len(streamed) == 12
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_a_vanishing_temperature_answers_greedily_and_fails_no_one_else(server: dict, ref) -> None:  # noqa: ANN001
    """logits / 5e-324 overflows: the draw used to raise on the last stage and fail every request of the step
    (503s carrying Ray's traceback); it takes the limit, the argmax, and the others finish as usual."""
    import concurrent.futures

    def post(temperature: float) -> httpx.Response:
        return httpx.post(server["url"] + "/completions", timeout=60,
                          json={"model": NAME, "prompt": "tiny", "max_tokens": 8, "temperature": temperature,
                                "seed": 3, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(post, [0.0, 5e-324, 0.0]))
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text[:200] for r in replies]
    want = ref.generate("tiny", max_new_tokens=8, ignore_eos=True)[0].text
    assert [r.json()["choices"][0]["text"] for r in replies] == [want] * 3


def test_stop_strings_end_the_text_before_them_in_streams_too(client: openai.OpenAI, ref) -> None:  # noqa: ANN001
    full = ref.generate("hello", max_new_tokens=12)[0].text
    stop = full[5:7]  # two characters in the middle of the greedy answer
    cut = full[:full.find(stop)]
    got = client.completions.create(model=NAME, prompt="hello", max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="hello", max_tokens=12,
                                                                    temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == cut  # nothing shown past the cut, not even a stop string's first character


@pytest.mark.parametrize(("body", "status", "what"), [
    ({"model": "no-such-model", "prompt": "x"}, 404, "model_not_found"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x" * 300}, 400, "context_length_exceeded"),
    ({"model": NAME, "prompt": [1, 2, 99999]}, 400, "outside the vocabulary"),
    ({"model": NAME, "prompt": 123}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": NAME, "prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty is not supported"),
    ({"model": NAME, "prompt": "x", "n": 9}, 429, "rate_limit_exceeded"),  # 9 > 4 active + 4 queued
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "a"}] * 3000}, 400, "at most 2048"),
    ({"model": NAME, "prompt": [5] * 300}, 400, "context_length_exceeded"),  # ids counted before they travel
    ({"model": NAME, "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),  # never silently cut down
    ({"model": NAME, "prompt": "x", "seed": 2**200}, 400, "seed"),  # OpenAI's seed is 64-bit
    ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(server: dict, body: dict, status: int,
                                                                  what: str) -> None:
    path = "/chat/completions" if "messages" in body else "/completions"
    r = httpx.post(server["url"] + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert what in json.dumps(err)
    assert err["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    if status == 429:
        assert r.headers["retry-after"] == "1"
    ok = httpx.post(server["url"] + "/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    wait_for(lambda: _idle(server["pipe"]), 10, "no request left behind")


def test_malformed_json_and_unknown_paths_are_json_4xx(server: dict) -> None:
    r = httpx.post(server["url"] + "/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server["url"] + "/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server["url"] + "/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_client_errors_are_raised_by_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=NAME, prompt="x", n=9)
    with pytest.raises(openai.BadRequestError, match="context is 256") as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "y" * 300}])
    assert e.value.code == "context_length_exceeded"


def test_a_client_that_disconnects_cancels_its_request_and_frees_its_caches(server: dict) -> None:
    pipe = server["pipe"]
    pipe.set_step_time(1, 0.1)  # ~100 ms a token: the answer takes 20 s, the client leaves at once
    try:
        body = {"model": NAME, "prompt": "go on", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server["url"] + "/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert not _idle(pipe)
        before = pipe.stats()["router"]["tokens_generated"]
        # the proxy passes the disconnect on within seconds, even on a loaded machine (CI saw > 6 s at 30 ms a token)
        wait_for(lambda: _idle(pipe), 15, "the dropped stream's request to be cancelled")
        assert pipe.stats()["router"]["tokens_generated"] - before < 170  # stopped, not run to the end

        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(server["url"] + "/completions", json={**body, "stream": False}, timeout=1.0)
        wait_for(lambda: _idle(pipe), 15, "the abandoned request to be cancelled")
    finally:
        pipe.set_step_time(1, 0.0)


def test_meshpipe_serve_cli_deploys_serves_and_stops_on_sigint(gguf: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "serve", "--model", str(gguf), "--port", str(port),
                             "--name", "cli-http"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()  # printed once the server answers
        assert f"http://127.0.0.1:{port}/v1" in line, proc.stderr.read() if proc.poll() is not None else line
        assert f"http://127.0.0.1:{port}/dashboard" in proc.stdout.readline()  # the live page
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        want = load_model(gguf).generate("hello", max_new_tokens=5)[0].text
        assert c.completions.create(model="cli-http", prompt="hello", max_tokens=5, temperature=0).choices[0].text \
            == want
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        errors = proc.stderr.read()
        assert "reading weights" in errors  # the progress bars went to stderr
        assert "Ray dashboard: http://" in errors and "ray get-auth-token" in errors  # Ray 2.60 asks for a token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_dashboard_page_and_status_are_served_beside_the_api(server: dict) -> None:
    base = server["url"].removesuffix("/v1")
    page = httpx.get(f"{base}/dashboard", timeout=30)
    assert page.status_code == 200 and 'id="route-graph"' in page.text
    status = httpx.get(f"{base}/v1/pipeline/status", timeout=60).json()
    assert status["deployment"] == NAME and len(status["replicas"]) == 2 and status["route"]
    missing = httpx.get(f"{base}/v1/pipeline/status", params={"deployment": "nope"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "deployment"


def test_meshpipe_serve_attaches_to_running_deployments_and_detaches(server: dict, ray_cluster: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "actors.cli", "serve", "--address", ray_cluster["gcs_address"],
                        "--name", NAME, "--port", str(free_port()), "--detach"], capture_output=True, text=True,
                       env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert server["url"] in r.stdout  # Serve was running already: its address, not the one asked for
    ok = httpx.post(server["url"] + "/completions", json={"model": NAME, "prompt": "x", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3  # still serving after it left
    r = subprocess.run([sys.executable, "-m", "actors.cli", "serve", "--address", ray_cluster["gcs_address"],
                        "--name", "no-such-deployment", "--detach"], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    assert r.returncode == 2 and "no deployment named 'no-such-deployment'" in r.stderr


@pytest.mark.smollm2
def test_smollm2_over_http_answers_as_the_python_api_does(server: dict) -> None:
    smol = Pipeline.deploy("smollm2-135m", num_stages=1, name="http-smollm2", dtype="float32")
    try:
        url = http.start([NAME, "http-smollm2"])  # one HTTP app in front of both deployments
        assert url == server["url"]
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert {m.id for m in c.models.list().data} == {NAME, "http-smollm2"}
        question = [{"role": "user", "content": "What is the capital of France?"}]
        got = c.chat.completions.create(model="http-smollm2", messages=question, max_tokens=16, temperature=0)
        want = smol.chat(question, max_new_tokens=16)
        assert got.choices[0].message.content == want.text and "Paris" in want.text
        assert got.usage.prompt_tokens == want.usage["prompt_tokens"]
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model="http-smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
        assert text == smol.generate("The capital of France is", max_new_tokens=8)[0].text
        assert text.startswith(" Paris")
    finally:
        http.start([NAME])
        smol.shutdown()


@pytest.mark.parametrize("asgi", ["2.3", "2.4"])
def test_a_stream_cut_short_at_a_send_closes_its_body_at_once(asgi: str) -> None:
    """A client that leaves while a chunk is being sent: Starlette drops the body generator where it
    stands, and only the garbage collector would run its `finally` (which cancels the requests); the
    response closes it at once, while the response object still holds it."""
    import asyncio
    import contextlib

    closed = []

    async def body() -> Any:
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
        finally:
            closed.append(True)

    sends = 0

    async def send(message: dict) -> None:
        nonlocal sends
        sends += 1
        if sends == 3:
            raise asyncio.CancelledError  # the server cancels the handler: the client went away

    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    response = http._ClosingStream(body(), media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"spec_version": asgi}}
    async def serve_it() -> list[bool]:
        with contextlib.suppress(asyncio.CancelledError):  # raised (ASGI 2.4) or taken by the task group (2.3)
            await response(scope, receive, send)
        return list(closed)  # before asyncio.run's own clean-up closes whatever generators are left

    assert asyncio.run(serve_it()) == [True]
