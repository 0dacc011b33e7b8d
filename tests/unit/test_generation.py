"""Sampling, stop rules, prompt checks and partitioning: pure code, no Ray actors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from actors.layout import head_cost, partition
from models import (
    ConfigError,
    InvalidRequestError,
    ModelConfig,
    SamplingParams,
    SequenceState,
    encode_prompt,
    is_batch,
    sample,
)
from models.generation import stream_safe

SMOL = ModelConfig()  # the defaults are SmolLM2-135M's shape
TINY = ModelConfig(vocab_size=100, dim=16, n_layers=4, n_heads=2, n_kv_heads=1, hidden_dim=32,
                   max_seq_len=32, eos_ids=(2,))


def test_greedy_is_argmax_and_logprobs_are_log_softmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens, lps = sample(logits, [SamplingParams(logprobs=3)] * 3, [0, 0, 0])
    assert tokens == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for i, lp in enumerate(lps):
        assert lp.token_id == tokens[i] and lp.logprob == pytest.approx(ref[i, tokens[i]].item())
        assert list(lp.top) == ref[i].topk(3).indices.tolist()


def test_seeded_sampling_is_reproducible_and_position_dependent() -> None:
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, [p], [pos])[0][0] for pos in range(20)]
    assert draws == [sample(logits, [p], [pos])[0][0] for pos in range(20)]
    assert len(set(draws)) > 10  # uniform logits: different positions draw different tokens


def test_top_k_and_top_p_restrict_the_draw() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0, -10.0]])
    for seed in range(50):
        t, _ = sample(logits, [SamplingParams(temperature=2.0, top_k=2, seed=seed)], [0])
        assert t[0] in (0, 1)
        t, _ = sample(logits, [SamplingParams(temperature=1.0, top_p=0.5, seed=seed)], [0])
        assert t[0] == 0  # token 0 alone has probability > 0.5


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_vanishing_temperature_draws_the_argmax_instead_of_failing(temperature: float, dtype: torch.dtype) -> None:
    """logits / T overflows for a subnormal T (NaN probabilities made the draw raise and fail every request
    of the step): the draw takes softmax's limit, the argmax, with and without top-k."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for top_k in (None, 5):
        params = [SamplingParams(temperature=temperature, top_k=top_k, seed=s) for s in range(4)]
        tokens, _ = sample(logits, params, [3, 3, 3, 3])
        assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("broken", [float("nan"), float("inf")])
def test_a_row_of_nan_or_inf_logits_fails_alone(broken: float) -> None:
    """One sequence's overflow is its own: its row gets FAILED, the others draw as they would without it
    (a NaN probability made the draw raise and fail every sequence of the step)."""
    from models.sampling import FAILED

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.8, seed=1, logprobs=2), SamplingParams(logprobs=1),
              SamplingParams(temperature=1.0, top_p=0.9, seed=2), SamplingParams()]
    want, want_lp = sample(logits, params, [5, 6, 7, 8])
    for bad in range(4):
        hurt = logits.clone()
        hurt[bad, 17] = broken
        tokens, lps = sample(hurt, params, [5, 6, 7, 8])
        assert tokens[bad] == FAILED and lps[bad] is None
        assert [t for i, t in enumerate(tokens) if i != bad] == [t for i, t in enumerate(want) if i != bad]
        assert [lp for i, lp in enumerate(lps) if i != bad] == [lp for i, lp in enumerate(want_lp) if i != bad]
    masked = logits.clone()
    masked[:, :100] = float("-inf")  # -inf is a masked token, not a broken row
    assert FAILED not in sample(masked, params, [5, 6, 7, 8])[0]


def test_a_failed_token_ends_its_sequence_with_a_typed_error() -> None:
    from models import NonFiniteLogitsError
    from models.sampling import FAILED

    s = SequenceState("req-9", [5, 6], SamplingParams(max_new_tokens=10), frozenset({2}), 32)
    s.add(7, None, None)
    with pytest.raises(NonFiniteLogitsError, match="sequence req-9: the model's logits after 4 tokens were NaN"):
        s.add_pass([8, FAILED], [None, None], None)
    assert s.generated == [7, 8] and not s.done


@pytest.mark.parametrize("bad", [
    {"max_new_tokens": 0}, {"max_new_tokens": -3}, {"temperature": -1.0}, {"temperature": float("inf")},
    {"temperature": float("nan")}, {"top_k": 0},
    {"top_p": 0.0}, {"top_p": 1.5}, {"logprobs": 99}, {"stop": [""]}, {"seed": 1.5}, {"seed": "7"},
    {"seed": True},
])
def test_bad_sampling_options_name_the_field(bad: dict) -> None:
    with pytest.raises(InvalidRequestError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_eos_is_excluded_and_finishes_with_stop() -> None:
    s = SequenceState("a", [5, 6], SamplingParams(max_new_tokens=10), frozenset({2}), 32)
    s.add(7, None, None)
    s.add(2, None, None)
    c = s.completion(None)
    assert c.token_ids == [7] and c.finish_reason == "stop"
    assert c.usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


def test_length_finish_and_context_limit() -> None:
    s = SequenceState("a", [5], SamplingParams(max_new_tokens=2), frozenset({2}), 32)
    s.add(7, None, None)
    assert not s.done
    s.add(8, None, None)
    assert s.finish_reason == "length"
    long = SequenceState("b", list(range(3, 33)), SamplingParams(max_new_tokens=99), frozenset(), 32)
    long.add(9, None, None)
    assert not long.done
    long.add(9, None, None)
    assert long.finish_reason == "length" and len(long.prompt) + len(long.generated) == 32


class _CharTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_stop_string_cuts_the_text() -> None:
    s = SequenceState("a", [1], SamplingParams(max_new_tokens=20, stop=("END",)), frozenset(), 64)
    for ch in "hello END more":
        s.add(ord(ch), None, _CharTokenizer())
        if s.done:
            break
    c = s.completion(_CharTokenizer())
    assert c.text == "hello " and c.finish_reason == "stop"


@pytest.mark.parametrize("prompt,match", [
    ("", "empty"), ([], "empty"), ([1, 100], "outside the vocabulary"), ([1, -1], "outside"),
    ([1, 2.5], "integers"), ([1, "a"], "integers"), ([True], "integers"), (list(range(3, 35)), "context"),
    (3.0, "a str or a list"), ("text", "no tokenizer"),
])
def test_bad_prompts(prompt: object, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        encode_prompt(prompt, TINY, None)  # type: ignore[arg-type]


def test_is_batch() -> None:
    assert not is_batch([1, 2, 3]) and not is_batch("a") and is_batch(["a", "b"]) and is_batch([[1], [2]])


def test_partition_balances_compute_with_the_head() -> None:
    assert head_cost(SMOL) == pytest.approx(8.0, rel=0.05)
    specs = partition(SMOL, num_stages=4)
    assert [len(s.layers) for s in specs] == [10, 10, 8, 2] or max(
        len(s.layers) + (head_cost(SMOL) if s.head else 0) for s in specs) <= 10.1
    assert specs[0].embed and specs[-1].head and sum(len(s.layers) for s in specs) == 30
    flat = [i for s in specs for i in s.layers]
    assert flat == list(range(30))  # contiguous, in order, each layer once


@pytest.mark.parametrize("s", range(1, 31))
def test_partition_every_stage_count_is_optimal(s: int) -> None:
    """Compare with brute force of the bottleneck over all contiguous splits (small S)."""
    specs = partition(SMOL, num_stages=s)
    assert len(specs) == s and all(spec.layers for spec in specs)
    worst = max(len(x.layers) + (head_cost(SMOL) if x.head else 0) for x in specs)
    # a lower bound: total work / S, and the head stage holds at least one layer
    assert worst >= max(sum([30, head_cost(SMOL)]) / s, 1 + head_cost(SMOL)) - 1e-9
    assert worst <= max(sum([30, head_cost(SMOL)]) / s + 1, 1 + head_cost(SMOL)) + 1e-9


def test_layers_per_stage_one_is_one_actor_per_layer() -> None:
    specs = partition(SMOL, layers_per_stage=1)
    assert len(specs) == 30 and all(len(s.layers) == 1 for s in specs)


def test_partition_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="more stages than"):
        partition(TINY, num_stages=5)
    with pytest.raises(ConfigError, match="layers_per_stage"):
        partition(TINY, layers_per_stage=0)
    with pytest.raises(ConfigError, match="exactly one"):
        partition(TINY, num_stages=2, layers_per_stage=2)
    with pytest.raises(ConfigError, match="do not fit"):
        partition(SMOL, num_stages=2, stage_memory_bytes=50e6)


def test_partition_respects_memory() -> None:
    layer = SMOL.layer_params() * 4
    emb = SMOL.embedding_params() * 4
    cap = emb + 9 * layer  # the first stage holds the embedding: at most 9 layers beside it
    specs = partition(SMOL, num_stages=4, stage_memory_bytes=cap)
    assert len(specs[0].layers) <= 9
    assert replace(specs[0], index=0) == specs[0]


@pytest.mark.parametrize(("text", "stop", "shown"), [
    ("Hello Par", ["Paris"], "Hello "),  # may be the start of the stop string: held back
    ("Hello Pax", ["Paris"], "Hello Pax"),
    ("ab\ufffd", [], "ab"),  # a multi-byte character whose last bytes are still to come
    ("ab\ufffd\ufffd", ["zz"], "ab"),
    ("x", ["xy", "x!"], ""),
    ("abc", [], "abc"),
    ("say EN", ["END", "N"], "say "),  # the longest tail that may start a stop string
    ("", ["x"], ""),
])
def test_stream_safe_never_shows_what_it_may_take_back(text: str, stop: list[str], shown: str) -> None:
    assert stream_safe(text, stop) == shown
    assert text.startswith(stream_safe(text, stop))


def test_prompts_are_checked_before_tokenising() -> None:
    """Text that is not Unicode is refused by name; text longer than any tokenisation could fit the
    context is refused without being tokenised (the bound: context x the longest token's bytes)."""
    from models import InvalidRequestError, ModelConfig, PromptTooLongError
    from models.generation import encode_prompt

    class NeverCalled:
        max_token_bytes = 4

        def encode(self, text: str) -> list[int]:
            raise AssertionError("tokenised")

    cfg = ModelConfig(vocab_size=256, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=8, max_seq_len=100)
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        encode_prompt("a\ud800b", cfg, NeverCalled())
    with pytest.raises(PromptTooLongError, match="401 bytes"):
        encode_prompt("x" * 401, cfg, NeverCalled())
