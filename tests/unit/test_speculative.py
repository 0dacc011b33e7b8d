"""Speculative decoding (`models.speculative`): the drafter, lossless verification, stop rules, the
cache rewind, the sampled distribution (chi-square) and the benchmark. No Ray."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import (
    Batch,
    InvalidRequestError,
    SamplingParams,
    SequenceState,
    Transformer,
    benchmark_speculative,
    generate_local,
    load_model,
    propose_drafts,
)
from models.cache import KVCache
from models.errors import CacheMissError
from models.speculative import accepted_prefix, speculative_step, tail_index
from tests.checkpoints import make_tiny_llama
from tests.unit.test_generate_local import CharTokenizer

PHRASE = [5, 17, 42, 99, 3]
PROMPTS = [PHRASE * 4, [5, 17, 42, 99, 3, 250, 7], [11, 12], [200], [7] * 9]  # repetitive, random, short


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Transformer:
    """Wide logit margins (initializer_range=0.5): its output rarely repeats, so drafts mostly miss."""
    return load_model(tiny_ckpt, dtype="float64")


@pytest.fixture(scope="module")
def loopy(tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """Small weights (initializer_range=0.02): greedy output falls into cycles, so drafts hit."""
    return load_model(make_tiny_llama(tmp_path_factory.mktemp("loopy") / "llama", n_layers=2, init=0.02),
                      dtype="float64")


def both(m: Transformer, prompts: list, n: int, k: int, **kw: object) -> tuple[list, list]:
    return generate_local(m, prompts, n, **kw), generate_local(m, prompts, n, speculative=k, **kw)


def same(plain: list, spec: list) -> None:
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in spec] == [o.finish_reason for o in plain]
    assert [o.text for o in spec] == [o.text for o in plain]
    assert [o.usage for o in spec] == [o.usage for o in plain]


# ---------- drafter ----------

def test_drafts_follow_the_most_recent_occurrence_of_the_longest_suffix() -> None:
    assert propose_drafts([1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 1, 2, 3], 2) == [7, 6]  # most recent wins
    assert propose_drafts([4, 2, 3, 9, 1, 3, 8, 2, 3], 2) == [9, 1]  # [2 3] beats the later [3]
    assert propose_drafts([1, 2, 5, 6, 7, 2], 3) == [5, 6, 7]  # falls back to n = 1
    assert propose_drafts([1, 2, 5, 6, 7, 2], 3, min_ngram=2) == []
    assert propose_drafts([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert propose_drafts([1, 2, 3, 1, 2], 1) == [3]  # at most k
    assert propose_drafts([1, 2, 1, 2], 0) == []
    assert propose_drafts([], 4) == [] and propose_drafts([3], 4) == []


def test_a_copy_that_reaches_the_end_continues_itself() -> None:
    assert propose_drafts([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert propose_drafts([7, 7, 7], 4) == [7, 7, 7, 7]
    assert propose_drafts([4, 5, 6, 4, 8, 4], 3) == [8, 4, 8]


def test_accepted_prefix_and_tail_index() -> None:
    assert accepted_prefix([1, 2, 3], [1, 2]) == 2
    assert accepted_prefix([1, 5, 3], [1, 2]) == 1
    assert accepted_prefix([9], []) == 0
    assert tail_index([3, 1, 4], [2, 1, 3]).tolist() == [1, 2, 3, 5, 6, 7]


def test_the_draft_budget_grows_on_hits_and_pauses_on_misses() -> None:
    from models.speculative import adapt_budget

    assert adapt_budget(4, 4, 4, 4) == 4 and adapt_budget(1, 8, 1, 1) == 2 and adapt_budget(0, 4, 0, 0) == 0
    assert adapt_budget(4, 4, 4, 0) == 2 and adapt_budget(1, 4, 1, 0) == 0  # misses halve, then pause
    assert adapt_budget(4, 4, 4, 2) == 4 and adapt_budget(3, 4, 0, 0) == 3  # partial hits, no drafts: kept


def test_speculative_is_validated() -> None:
    assert SamplingParams(speculative=16).speculative == 16 and SamplingParams().speculative == 0
    for bad in (-1, 17, 2.0, True, "4"):
        with pytest.raises(InvalidRequestError, match="speculative"):
            SamplingParams(speculative=bad)


# ---------- lossless: greedy ----------

@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_is_identical_with_and_without_speculation(model: Transformer, loopy: Transformer,
                                                          k: int) -> None:
    for m in (model, loopy):
        plain, spec = both(m, PROMPTS, 24, k, ignore_eos=True)
        same(plain, spec)
        assert all(o.speculation is None for o in plain)
        for o in spec:
            st = o.speculation
            assert 0 <= st["accepted"] <= st["drafted"] <= k * st["passes"]
            assert st["passes"] + st["accepted"] == len(o.token_ids)  # each pass: accepted drafts + one token


def test_drafts_are_accepted_on_a_repetitive_prompt(loopy: Transformer) -> None:
    out = generate_local(loopy, PHRASE * 4, 40, ignore_eos=True, speculative=4)[0]
    assert out.speculation["accepted"] > 0
    assert out.speculation["passes"] < len(out.token_ids)


def test_max_new_tokens_cuts_an_accepted_run(loopy: Transformer) -> None:
    for n in range(1, 14):
        plain, spec = both(loopy, PROMPTS, n, 8, ignore_eos=True)
        same(plain, spec)
        assert all(len(o.token_ids) == n for o in spec)


def test_context_end_is_respected(loopy: Transformer) -> None:
    prompt = PHRASE * ((loopy.cfg.max_seq_len - 20) // len(PHRASE))
    plain, spec = both(loopy, [prompt], 64, 8, ignore_eos=True)
    same(plain, spec)
    assert spec[0].finish_reason == "length" and len(prompt) + len(spec[0].token_ids) == loopy.cfg.max_seq_len


def test_eos_inside_an_accepted_run(loopy: Transformer) -> None:
    ref = generate_local(loopy, PROMPTS, 30, ignore_eos=True)
    cfg = loopy.cfg
    try:
        for eos in sorted({t for o in ref for t in o.token_ids[3:20]})[:6]:
            loopy.cfg = replace(cfg, eos_ids=(eos,))
            plain, spec = both(loopy, PROMPTS, 30, 4)
            same(plain, spec)
            for o, r in zip(spec, ref):
                cut = r.token_ids.index(eos) if eos in r.token_ids else None
                assert o.token_ids == r.token_ids[:cut]
    finally:
        loopy.cfg = cfg


def stops_inside_a_run(m: Transformer, prompt: list[int], params: SamplingParams,
                       tokenizer: CharTokenizer | None = None) -> bool:
    """Whether the sequence stops on a confirmed draft (later drafts of that pass are not emitted)."""
    s = SequenceState("s", prompt, params, frozenset(m.cfg.eos_ids), m.cfg.max_seq_len)
    cache = m.new_cache()
    while not s.done:
        (res,) = speculative_step(m, cache, [s], tokenizer, torch.device("cpu"))
    return s.finish_reason == "stop" and res.emitted <= res.accepted < res.drafted


def test_a_stop_on_a_confirmed_draft_ends_the_pass(loopy: Transformer) -> None:
    """Drafts copy earlier tokens, so a stop lands on one when it was in the prompt: the prompt is a
    greedy run's start (its greedy continuation is the run's rest) and the stop comes from both."""
    ref = generate_local(loopy, PHRASE * 4, 40, ignore_eos=True)[0].token_ids
    params = SamplingParams(max_new_tokens=20, speculative=8, seed=0)
    cfg, tok, hits = loopy.cfg, CharTokenizer(), set()
    try:
        for cut in (8, 12, 16, 20):
            prompt, rest = PHRASE * 4 + ref[:cut], ref[cut:cut + 20]
            for eos in [t for t in dict.fromkeys(rest) if t in prompt][:3]:
                loopy.cfg = replace(cfg, eos_ids=(eos,))
                if stops_inside_a_run(loopy, prompt, params):
                    hits.add("eos")
                    out = generate_local(loopy, prompt, 20, speculative=8)[0]
                    assert out.token_ids == rest[:rest.index(eos)]
            loopy.cfg = replace(cfg, eos_ids=())
            texts = [tok.decode(rest[i:i + 2]) for i in range(len(rest) - 1)]
            for stop in [t for t in dict.fromkeys(texts) if t in tok.decode(prompt)][:3]:
                if stops_inside_a_run(loopy, prompt, replace(params, stop=(stop,)), tok):
                    hits.add("stop")
                    loopy.tokenizer = tok
                    same(*both(loopy, [prompt], 20, 8, stop=[stop]))
                    loopy.tokenizer = None
    finally:
        loopy.cfg, loopy.tokenizer = cfg, None
    assert hits == {"eos", "stop"}


def test_stop_strings_inside_an_accepted_run(loopy: Transformer) -> None:
    loopy.tokenizer = CharTokenizer()
    try:
        full = generate_local(loopy, "ABCDEABCDEABCDE", 30, ignore_eos=True)[0]
        for i in range(2, 24, 3):
            stop = full.text[i:i + 2]
            plain, spec = both(loopy, ["ABCDEABCDEABCDE", "XYZ"], 30, 4, ignore_eos=True, stop=[stop])
            same(plain, spec)
            assert spec[0].finish_reason == "stop" and stop not in spec[0].text
    finally:
        loopy.tokenizer = None


# ---------- lossless: seeded sampling ----------

@pytest.mark.parametrize("filters", [{}, {"top_k": 20}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.8}])
def test_seeded_sampling_is_identical(model: Transformer, loopy: Transformer, filters: dict) -> None:
    for m in (model, loopy):
        for seed in (0, 7, 1234):
            plain, spec = both(m, PROMPTS, 16, 4, temperature=1.0, seed=seed, ignore_eos=True, logprobs=2,
                               **filters)
            same(plain, spec)
            for p, s in zip(plain, spec):
                assert [lp.token_id for lp in s.logprobs] == [lp.token_id for lp in p.logprobs]
                assert [lp.logprob for lp in s.logprobs] == pytest.approx([lp.logprob for lp in p.logprobs])


def test_sampled_run_accepts_drafts(loopy: Transformer) -> None:
    # the loopy model's logits are small: a low temperature makes its cycles likely enough to draft
    plain, spec = both(loopy, [PHRASE * 4], 40, 4, temperature=0.005, seed=3, ignore_eos=True)
    same(plain, spec)
    assert spec[0].speculation["accepted"] > 0


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities; categories expected < 5 times are pooled."""
    from scipy.stats import chisquare

    n = int(counts.sum())
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    if exp[-1] < 5:  # fold a small pooled tail into the rest
        obs, exp = obs[:-1], exp[:-1]
        obs[-1] += counts[~big].sum()
        exp[-1] += expected[~big].sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_sampled_tokens_follow_the_model_softmax(model: Transformer) -> None:
    """Many seeds: the first token, drawn at the prompt's last position, and the second after a
    confirmed first draft, drawn at that draft's position, are distributed as softmax(logits)."""
    pytest.importorskip("scipy")
    V = model.cfg.vocab_size

    def softmax_after(seqs: list[list[int]]) -> torch.Tensor:  # (len(seqs), V), equal lengths
        n = len(seqs[0])
        batch = Batch.build([str(i) for i in range(len(seqs))], [0] * len(seqs), [n] * len(seqs))
        logits = model(torch.tensor(sum(seqs, [])), batch, model.new_cache())
        return torch.softmax(logits.double(), -1)

    # a prompt whose first draft c is as likely as can be: PHRASE c 60 61 PHRASE drafts [c, 60, 61, ...]
    candidates = [PHRASE + [c, 60, 61] + PHRASE for c in range(V)]
    c = int(softmax_after(candidates)[torch.arange(V), torch.arange(V)].argmax())
    prompt = candidates[c]
    assert propose_drafts(prompt, 4)[0] == c
    torch.manual_seed(0)  # the seeds generate_local draws per sequence
    outs = generate_local(model, [prompt] * 4000, 2, temperature=1.0, ignore_eos=True, speculative=4)
    check_first_two_tokens(outs, prompt, c, softmax_after, min_second=100)


def check_first_two_tokens(outs: list, prompt: list[int], c: int, softmax_after: Callable[[list], torch.Tensor],
                           min_second: int) -> None:
    """The first tokens, and the second ones after the draft `c` was confirmed, follow the softmax
    (chi-square); every confirmed `c` counted as an accepted draft."""
    V = softmax_after([prompt]).shape[-1]
    first = torch.tensor([o.token_ids[0] for o in outs])
    assert chi_square_p(torch.bincount(first, minlength=V), softmax_after([prompt])[0]) > 0.001
    second = torch.tensor([o.token_ids[1] for o in outs if o.token_ids[0] == c])
    assert len(second) > min_second
    assert sum(o.speculation["accepted"] for o in outs) == len(second)  # those are the accepted drafts
    assert chi_square_p(torch.bincount(second, minlength=V), softmax_after([prompt + [c]])[0]) > 0.001


# ---------- the cache ----------

def test_the_cache_keeps_only_accepted_positions(loopy: Transformer) -> None:
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, speculative=8, seed=0)
    s = SequenceState("s", PHRASE * 4, params, frozenset(), loopy.cfg.max_seq_len)
    cache = loopy.new_cache()
    drafted = 0
    while not s.done:
        (res,) = speculative_step(loopy, cache, [s], None, torch.device("cpu"))
        drafted += res.drafted
        if not s.done:
            assert cache.length_of["s"] == s.cached == len(s.prompt) + len(s.generated) - 1
    assert drafted > s.spec_accepted  # some drafts were rejected and rewound
    assert s.generated == generate_local(loopy, PHRASE * 4, 30, ignore_eos=True)[0].token_ids


def test_rewind_refuses_positions_it_does_not_hold() -> None:
    cache = KVCache([0], 1, 4, torch.float64, torch.device("cpu"), num_tokens=64)
    cache.prepare(Batch.build(["a"], [0], [5]))
    cache.rewind("a", 3)
    assert cache.length_of["a"] == 3 and cache.tokens_held() == 3
    with pytest.raises(CacheMissError):
        cache.rewind("a", 4)


def test_logits_at_reads_several_positions(model: Transformer) -> None:
    seqs = [PHRASE * 2, [11, 12, 13]]
    lengths = [len(x) for x in seqs]
    at = tail_index(lengths, [3, 2])
    logits = model(torch.tensor(sum(seqs, [])), Batch.build(["a", "b"], [0, 0], lengths), model.new_cache(),
                   logits_at=at)
    assert logits.shape == (5, model.cfg.vocab_size)
    rows = []
    for seq, c in zip(seqs, [3, 2]):
        for end in range(len(seq) - c + 1, len(seq) + 1):
            rows.append(model(torch.tensor(seq[:end]), Batch.build(["x"], [0], [end]), model.new_cache())[0])
    torch.testing.assert_close(logits, torch.stack(rows))


# ---------- the benchmark ----------

def test_benchmark_reports_both_modes(loopy: Transformer) -> None:
    report = benchmark_speculative(loopy, [PHRASE * 4, [11, 12]], max_new_tokens=24, k=4)
    json.dumps(report)
    assert report["identical"] is True
    assert report["plain"]["tokens"] == report["speculative"]["tokens"] == 48
    assert report["plain"]["tokens_per_pass"] == 1.0
    assert report["speculative"]["accepted"] > 0 and report["speculative"]["tokens_per_pass"] > 1.0


@pytest.mark.parametrize(("tokens", "accepted", "limit", "stop", "taken", "counted"), [
    ([1, 2, 3, 4], 3, 16, (), 4, 3),  # every draft confirmed, then the pass's own token
    ([1, 2, 9], 2, 16, (), 3, 2),  # the third draft rejected: the draw that replaced it
    ([1, 2, 3, 4], 3, 16, ("BC",), 2, 2),  # a stop string inside the confirmed run: the drafts after it not counted
    ([1, 0, 3, 4], 3, 16, (), 2, 2),  # EOS confirmed as a draft ends the run (counted, as it saved a pass)
    ([1, 2, 3, 4], 3, 2, (), 2, 2),  # max_new_tokens cuts the run
])
def test_a_pass_counts_the_drafts_accepted_among_the_tokens_the_sequence_took(
        tokens: list[int], accepted: int, limit: int, stop: tuple[str, ...], taken: int, counted: int) -> None:
    seq = SequenceState("s", [7, 8], SamplingParams(max_new_tokens=limit, speculative=3, stop=stop), frozenset({0}), 64)
    assert seq.add_pass(tokens, [None] * len(tokens), CharTokenizer(), drafted=3, accepted=accepted) == taken
    assert seq.speculation() == {"passes": 1, "drafted": 3, "accepted": counted}
    assert seq.done == (taken < len(tokens))
