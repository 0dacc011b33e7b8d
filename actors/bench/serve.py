"""`meshpipe bench http`: what the OpenAI-compatible HTTP front costs over `Pipeline` calls.

One deployment, one Ray session, the same greedy requests (a fixed prompt, `ignore_eos`, so every
request makes exactly `new_tokens` tokens) sent by `clients` threads at a time, alternately through
the Python API (`Pipeline.generate`, the baseline) and through HTTP (the `openai` client against
`meshpipe serve`); then time to first token, `Pipeline.stream` against an HTTP stream. Each figure
is the best of `repeats` rounds; one JSON-able dict per measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actors.bench.pipeline import RAW_PROMPT, _timed, machine


def _rounds(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(best, median) of `repeats` timings that `fn` takes itself (time to first token, not to the close)."""
    times = [fn() for _ in range(repeats)]
    return min(times), statistics.median(times)


def bench_http(model: str, stages: int = 2, clients: tuple[int, ...] = (1, 8), requests: int = 16,
               new_tokens: int = 32, repeats: int = 3, port: int = 8011) -> Iterator[dict[str, Any]]:
    import openai
    from ray import serve

    from actors import serve as http
    from actors.pipeline import Pipeline

    pipe = Pipeline.deploy(model, num_stages=stages, name="bench-http")
    try:
        url = http.start(["bench-http"], port=port)
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)

        def python_call() -> int:
            return pipe.generate(RAW_PROMPT, max_new_tokens=new_tokens, ignore_eos=True)[0].usage["completion_tokens"]

        def http_call() -> int:
            r = api.completions.create(model="bench-http", prompt=RAW_PROMPT, max_tokens=new_tokens, temperature=0,
                                       extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        python_call(), http_call()  # warm both paths
        yield {"bench": "machine", **machine(), "model": model, "stages": stages}
        for n in clients:
            for path, call in (("python", python_call), ("http", http_call)):
                def round_() -> None:
                    with ThreadPoolExecutor(n) as pool:
                        made = sum(pool.map(lambda _: call(), range(requests)))
                    assert made == requests * new_tokens, made

                best, median = _timed(round_, repeats)
                yield {"bench": "http_throughput", "path": path, "clients": n, "requests": requests,
                       "new_tokens": new_tokens, "tokens_per_s": requests * new_tokens / best,
                       "median_tokens_per_s": requests * new_tokens / median,
                       "ms_per_request": best / requests * n * 1e3}

        def first_python() -> float:
            t0 = time.perf_counter()
            it = pipe.stream(RAW_PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
            next(it)
            took = time.perf_counter() - t0
            it.close()
            return took

        def first_http() -> float:
            t0 = time.perf_counter()
            with api.completions.create(model="bench-http", prompt=RAW_PROMPT, max_tokens=new_tokens,
                                        temperature=0, stream=True, extra_body={"ignore_eos": True}) as s:
                next(iter(s))
                return time.perf_counter() - t0

        for path, fn in (("python", first_python), ("http", first_http)):
            best, median = _rounds(fn, repeats * 3)
            yield {"bench": "http_first_token", "path": path, "ms": best * 1e3, "median_ms": median * 1e3}
    finally:
        serve.shutdown()
        pipe.shutdown()
