"""`meshpipe bench prefix`: prefix caching and chunked prefill, each beside its baseline in one run.

- `ttft`: time to first token (one new token) of requests sharing a ~1,000-token system prompt, on
  a deployment with prefix caching and on one without (the first request of each warms it).
- `chat`: multi-turn conversations over 2 replicas per stage, interleaved: which replicas each
  turn ran on (a turn stays when its route is the previous turn's) and the prefix hit rate.
- `chunked`: while a 4,000-token prompt is prefilled, the longest gap between the tokens of two
  other streams, with chunked prefill and with the prompt in one step.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

from actors.bench.spec import PASSAGE

log = logging.getLogger(__name__)

QUESTIONS = ["Where did the wool carts go?", "What did the tolls pay for?", "When did the railway arrive?",
             "What became of the granary?", "What do visitors come for?", "What happens in May?"]
TURNS = [["Tell me about a river town.", "Who built its bridge?", "What happened when the railway came?"],
         ["Name three kinds of bread.", "Which one keeps longest?", "How is it baked?"],
         ["What is a lighthouse for?", "Who kept them?", "Are they still kept today?"]]


def system_prompt(tokens_wanted: int, tokenizer: Any) -> str:
    """A system prompt of about `tokens_wanted` tokens (the passage, repeated with numbered sections)."""
    parts, text = [], ""
    while len(tokenizer.encode(text)) < tokens_wanted:
        parts.append(f"Section {len(parts) + 1}. {PASSAGE}")
        text = "You answer questions about this document.\n\n" + "\n\n".join(parts)
    return text


def bench_prefix(model: str = "smollm2-135m", stages: int = 2, system_tokens: int = 1000, requests: int = 5,
                 long_tokens: int = 4000, chunk: int = 512) -> Iterator[dict[str, Any]]:
    """Rows `ttft`, `chat` and `chunked` (module docstring), each with its baseline measured in this run."""
    import ray

    from actors.bench.pipeline import machine

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_gpus=2 * stages, include_dashboard=False, log_to_driver=False)
    try:
        info = {"model": model, "stages": stages, "machine": machine()}
        yield {"bench": "prefix", "part": "ttft", **_ttft(model, stages, system_tokens, requests), **info}
        yield {"bench": "prefix", "part": "chat", **_chat(model, stages), **info}
        yield {"bench": "prefix", "part": "chunked", **_chunked(model, stages, long_tokens, chunk), **info}
    finally:
        if started:
            ray.shutdown()


def _ttft(model: str, stages: int, system_tokens: int, requests: int) -> dict[str, Any]:
    from actors.pipeline import Pipeline
    from models.loading import resolve_source
    from models.tokenizer import load_tokenizer

    system = system_prompt(system_tokens, load_tokenizer(resolve_source(model)))
    out: dict[str, Any] = {}
    for caching in (True, False):
        pipe = Pipeline.deploy(model, num_stages=stages, name="bench-prefix", prefix_caching=caching)
        try:
            times, answers = [], []
            for i in range(requests + 1):  # the first warms: it computes the system prompt
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
                t0 = time.perf_counter()
                c = pipe.chat(messages, max_new_tokens=1)
                times.append(time.perf_counter() - t0)
                answers.append(c.token_ids)
            key = "cached" if caching else "uncached"
            out[f"{key}_ttft_s"] = round(statistics.median(times[1:]), 4)
            out[f"{key}_first_s"] = round(times[0], 4)
            out[f"{key}_answers"] = answers
            out["prompt_tokens"] = c.usage["prompt_tokens"]
            out[f"{key}_prefix"] = pipe.stats()["router"]["prefix"]
        finally:
            pipe.shutdown()
    out["speedup"] = round(out["uncached_ttft_s"] / out["cached_ttft_s"], 2)
    out["identical"] = out.pop("cached_answers") == out.pop("uncached_answers")
    return out


def _chat(model: str, stages: int, new_tokens: int = 24) -> dict[str, Any]:
    from actors.pipeline import Pipeline

    pipe = Pipeline.deploy(model, num_stages=stages, replicas_per_stage=2, name="bench-prefix-chat")
    try:
        histories: list[list[dict[str, str]]] = [[] for _ in TURNS]
        routes: list[list[list[str]]] = [[] for _ in TURNS]
        for turn in range(len(TURNS[0])):
            for conv, questions in enumerate(TURNS):  # interleaved: each conversation's turns alternate
                histories[conv].append({"role": "user", "content": questions[turn]})
                c = pipe.chat(histories[conv], max_new_tokens=new_tokens)
                histories[conv].append({"role": "assistant", "content": c.text})
                routes[conv].append(c.route)
        stayed = sum(r[t] == r[t - 1] for r in routes for t in range(1, len(r)))
        moves = sum(len(r) - 1 for r in routes)
        return {"conversations": len(TURNS), "turns": len(TURNS[0]), "replicas_per_stage": 2,
                "turns_on_previous_route": f"{stayed}/{moves}", "routes": routes,
                "prefix": pipe.stats()["router"]["prefix"]}
    finally:
        pipe.shutdown()


def _chunked(model: str, stages: int, long_tokens: int, chunk: int) -> dict[str, Any]:
    from actors.pipeline import Pipeline

    long_prompt = [(37 * i) % 20000 + 100 for i in range(long_tokens)]
    out: dict[str, Any] = {"long_prompt_tokens": long_tokens}
    for label, size in (("chunked", chunk), ("whole", long_tokens)):
        pipe = Pipeline.deploy(model, num_stages=stages, name="bench-prefix-chunk", prefill_chunk=size)
        try:
            pipe.generate([[100, 101, 102]], max_new_tokens=2)  # warm
            stamps: list[list[float]] = [[], []]
            stop = threading.Event()

            def stream(k: int) -> None:
                for _ in pipe.stream([200 + k, 300, 400], max_new_tokens=4000, ignore_eos=True):
                    stamps[k].append(time.perf_counter())
                    if stop.is_set():
                        break
            threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            time.sleep(2.0)  # both streams decoding
            t0 = time.perf_counter()
            pipe.generate([long_prompt], max_new_tokens=1)
            t1 = time.perf_counter()
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
            before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b < t0]
            out[f"{label}_prefill_s"] = round(t1 - t0, 3)
            out[f"{label}_max_gap_s"] = round(max(gaps), 3) if gaps else None
            out[f"{label}_median_gap_before_s"] = round(statistics.median(before), 4) if before else None
        finally:
            pipe.shutdown()
    out["prefill_chunk"] = chunk
    return out
