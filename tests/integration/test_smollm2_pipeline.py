"""SmolLM2 split into Ray stage actors: the same greedy tokens as the single-process model."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from actors import Pipeline
from models import Transformer
from tests.support import min_margin, tokens

pytestmark = [pytest.mark.smollm2, pytest.mark.usefixtures("ray_cluster")]

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first humans"]
NEW = 10


@pytest.fixture(scope="module")
def reference(smollm2: Transformer) -> list[list[int]]:
    ref = smollm2.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True, logprobs=2)
    assert min_margin(ref) > 1e-3  # fp32 batching noise (~1e-5) cannot flip these tokens
    return tokens(ref)


REPEAT = ("Repeat exactly: one two three four five six seven eight nine ten. Repeat exactly: one two three four "
          "five six seven eight nine ten. Repeat exactly: one two")  # prompt lookup drafts, some accepted


@pytest.fixture(scope="module")
def repeat_reference(smollm2: Transformer) -> list[int]:
    ref = smollm2.generate([REPEAT], max_new_tokens=16, ignore_eos=True, logprobs=2)
    assert min_margin(ref) > 1e-3
    return ref[0].token_ids


@pytest.mark.parametrize("layout", [{"num_stages": 1}, {"num_stages": 2}, {"num_stages": 4},
                                    {"layers_per_stage": 1}], ids=["S1", "S2", "S4", "one-layer-per-actor"])
def test_pipeline_equals_single_process(reference: list[list[int]], repeat_reference: list[int],
                                        layout: dict) -> None:
    pipe = Pipeline.deploy("smollm2-135m", name="smol", dtype="float32", threads_per_stage=1, **layout)
    try:
        assert len(pipe.describe()["stages"]) == layout.get("num_stages", 30)
        assert tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)) == reference
        if layout.get("num_stages") == 4:
            # speculative decoding through the 4-stage ring: the plain greedy tokens, drafts kept and rejected
            assert tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True, speculative=4)) == reference
            spec = pipe.generate(REPEAT, max_new_tokens=16, ignore_eos=True, speculative=4)[0]
            assert spec.token_ids == repeat_reference
            assert 0 < spec.speculation["accepted"] < spec.speculation["drafted"], spec.speculation
            out = pipe.generate("The capital of France is", max_new_tokens=8)[0]
            assert "Paris" in out.text
            answer = pipe.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
            assert "Paris" in answer.text and answer.finish_reason == "stop"
    finally:
        pipe.shutdown()


def test_sixteen_concurrent_requests_equal_one_at_a_time(smollm2: Transformer) -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    prompts = [f"Here is a list of {i + 2} Greek letters: " + ", ".join(words[: i + 1]) for i in range(16)]
    alone = [smollm2.generate(p, max_new_tokens=6, ignore_eos=True, logprobs=2)[0] for p in prompts]
    assert min_margin(alone) > 1e-3
    pipe = Pipeline.deploy("smollm2-135m", num_stages=2, name="smol16", micro_batches=2, threads_per_stage=1)
    try:
        with cf.ThreadPoolExecutor(16) as ex:
            together = list(ex.map(lambda p: pipe.generate(p, max_new_tokens=6, ignore_eos=True)[0], prompts))
        assert tokens(together) == tokens(alone)
        assert [c.usage for c in together] == [c.usage for c in alone]
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_lossy_message_codecs_keep_the_greedy_tokens(reference: list[list[int]], codec: str) -> None:
    """fp16 (and int8, which keeps each block's largest value aside) messages between 2 stages."""
    pipe = Pipeline.deploy("smollm2-135m", num_stages=2, name=f"smol-{codec}", dtype="float32", codec=codec,
                           threads_per_stage=1)
    try:
        assert pipe.describe()["links"][1]["codec"] == codec
        got = tokens(pipe.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True))
        diverged = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
        assert not diverged, f"{codec}: prompts {diverged} diverge"
    finally:
        pipe.shutdown()
