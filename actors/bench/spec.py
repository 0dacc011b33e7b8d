"""`meshpipe bench spec`: speculative decoding through a pipeline, with and without drafts, in one run.

One deployment (S stages, batch 1, greedy, `ignore_eos=True`) answers two fixed chat prompts, each
timed without speculation and with `speculative=k` (prompt-lookup drafts, or a draft model's),
alternating so both see the same machine: a "Repeat exactly" request over a ~200-token passage (the
answer copies the prompt, so drafts hit) and a story request (little to copy: speculation must not
cost much). Rows carry the prompts, tokens/s, tokens a pass, the speedup and whether both runs'
tokens are identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

PASSAGE = (
    "The river town of Ashford grew up around a stone bridge built by monks in the twelfth century. "
    "For three hundred years the bridge carried wool carts to the market on the northern bank, and the "
    "tolls paid for a school, a granary and a small hospital run by the brothers. When the railway "
    "arrived in 1847, the market moved to the station and the bridge fell quiet. The granary became a "
    "brewery, the school a library, and the hospital a row of cottages with blue doors. Today visitors "
    "come for the bridge itself: its seven arches, the worn steps down to the water, and the carved "
    "heads of saints along the parapet, each one said to watch over a different trade. On the first "
    "Sunday of May the town still walks across it at dawn, carrying bundles of wool and loaves of bread, "
    "to remember the monks who built it and the merchants who kept it standing."
)
PROMPTS = {
    "repeat": "Repeat exactly the following passage, word for word, and nothing else:\n\n" + PASSAGE,
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def bench_spec(model: str = "smollm2-135m", stages: int = 4, new_tokens: int = 160, k: int = 4,
               repeats: int = 2, draft_model: str | None = None) -> Iterator[dict[str, Any]]:
    """One row per prompt: plain and speculative tokens/s through one deployment, best of `repeats`;
    drafts from prompt lookup, or from `draft_model` (deployed with it)."""
    import ray

    from actors.bench.pipeline import machine
    from actors.pipeline import Pipeline

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_gpus=stages, include_dashboard=False, log_to_driver=False)
    info = machine()
    pipe = Pipeline.deploy(model, num_stages=stages, name=f"bench-spec-{stages}", draft_model=draft_model)
    try:
        for label, text in PROMPTS.items():
            messages = [{"role": "user", "content": text}]

            def run(spec: int) -> tuple[float, Any]:
                t0 = time.perf_counter()
                c = pipe.chat(messages, max_new_tokens=new_tokens, ignore_eos=True, speculative=spec)
                return time.perf_counter() - t0, c

            run(0), run(k)  # warm-up: caches, routes, the ring
            best = {0: (float("inf"), None), k: (float("inf"), None)}
            for _ in range(repeats):
                for spec in (0, k):  # alternating: both modes see the same machine
                    s, c = run(spec)
                    if s < best[spec][0]:
                        best[spec] = (s, c)
            (plain_s, plain), (spec_s, spec) = best[0], best[k]
            n, m = len(plain.token_ids), len(spec.token_ids)
            drafts = spec.speculation or {"passes": m, "accepted": 0}
            yield {"bench": "spec", "prompt": label, "prompt_text": text,
                   "prompt_tokens": plain.usage["prompt_tokens"], "stages": stages, "batch": 1, "k": k,
                   "new_tokens": n, "plain_tokens_per_s": round(n / plain_s, 2),
                   "spec_tokens_per_s": round(m / spec_s, 2), "speedup": round((m / spec_s) / (n / plain_s), 3),
                   "tokens_per_pass": round(m / drafts["passes"], 3) if drafts["passes"] else None,
                   "accepted": drafts["accepted"], "identical": spec.token_ids == plain.token_ids,
                   "drafter": draft_model or "prompt lookup", "model": model, "machine": info}
    finally:
        pipe.shutdown()
        if started:
            ray.shutdown()
