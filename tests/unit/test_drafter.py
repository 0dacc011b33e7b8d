"""Draft-model drafting (`models.drafter`): greedy drafts that follow the sequence through rejections,
lossless output whatever the drafter, and the limits (vocabulary, context, a full pool). No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import ConfigError, Transformer, generate_local, load_model, load_stage
from models.drafter import ModelDrafter
from tests.checkpoints import make_tiny_llama
from tests.support import tokens

PROMPTS = [[5, 17, 42, 99, 3] * 4, [5, 17, 42, 99, 3, 250, 7], [11, 12], [200]]


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Transformer:
    return load_model(tiny_ckpt, dtype="float64")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """Another random model with the same vocabulary: its drafts are mostly wrong."""
    return load_model(make_tiny_llama(tmp_path_factory.mktemp("other") / "llama", n_layers=1, seed=9),
                      dtype="float64")


def greedy_continuation(m: Transformer, toks: list[int], k: int) -> list[int]:
    """k greedy tokens after `toks` from scratch (no drafter state)."""
    return generate_local(m, toks, k, ignore_eos=True)[0].token_ids


def test_drafts_are_the_draft_models_greedy_continuation_through_rejections(model: Transformer,
                                                                            other: Transformer) -> None:
    drafter = ModelDrafter(other)
    seqs = {"a": list(PROMPTS[0]), "b": list(PROMPTS[1])}
    for step in range(6):  # the sequences go on differently from the drafts: rejected drafts are rewound
        items = [(sid, toks, 4) for sid, toks in seqs.items()]
        drafts = drafter.propose(items)
        for (sid, toks, _), d in zip(items, drafts):
            assert d == greedy_continuation(other, toks, 4)
            seqs[sid] = toks + d[:step % 3] + [(7 * step + len(toks)) % 256]  # some drafts kept, then another token
    assert drafter.passes == 6 * 4  # one batched pass per draft position, both sequences in each


def test_the_model_as_its_own_drafter_gets_every_draft_accepted(model: Transformer) -> None:
    plain = generate_local(model, PROMPTS, 24, ignore_eos=True)
    spec = generate_local(model, PROMPTS, 24, ignore_eos=True, speculative=4, draft_model=model)
    assert tokens(spec) == tokens(plain)
    for o in spec:
        s = o.speculation
        assert s["accepted"] == s["drafted"] > 0 and s["passes"] <= -(-24 // 5) + 1


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 4}, {"temperature": 0.7, "top_k": 20, "seed": 1}])
def test_any_draft_model_leaves_the_tokens_unchanged(model: Transformer, other: Transformer,
                                                     sampling: dict) -> None:
    plain = generate_local(model, PROMPTS, 20, ignore_eos=True, **sampling)
    spec = generate_local(model, PROMPTS, 20, ignore_eos=True, speculative=3, draft_model=other, **sampling)
    assert tokens(spec) == tokens(plain)
    assert [o.finish_reason for o in spec] == [o.finish_reason for o in plain]


def test_a_draft_model_with_another_vocabulary_is_refused(model: Transformer, tmp_path: Path) -> None:
    wide = load_model(make_tiny_llama(tmp_path / "wide", n_layers=1, vocab=300))
    with pytest.raises(ConfigError, match="vocabulary has 300 tokens but the model's has 256"):
        generate_local(model, [1, 2], 2, speculative=2, draft_model=wide)
    with pytest.raises(ConfigError, match="whole model"):
        ModelDrafter(load_stage(make_tiny_llama(tmp_path / "part", n_layers=2), layers=[0], head=False))


def test_a_full_pool_or_the_draft_models_context_means_no_drafts_not_an_error(other: Transformer) -> None:
    drafter = ModelDrafter(other, pool_tokens=32)  # two blocks of 16
    assert drafter.propose([("long", list(range(40)), 4)]) == [[]]
    assert "long" not in drafter.held and len(drafter.cache) == 0  # what it took is given back
    ctx = other.cfg.max_seq_len
    near_end = ModelDrafter(other).propose([("a", [3] * (ctx - 2), 4), ("b", [3] * ctx, 4), ("c", [3], 0)])
    assert len(near_end[0]) == 2 and near_end[1] == [] and near_end[2] == []


def test_a_pool_too_small_for_every_sequence_keeps_drafting_those_it_holds(other: Transformer) -> None:
    drafter = ModelDrafter(other, pool_tokens=64)  # four blocks of 16: two sequences of 20 tokens, not three
    seqs = {sid: [(7 * j + n) % 256 for j in range(20)] for n, sid in enumerate("abc")}
    for _ in range(3):
        drafts = drafter.propose([(sid, toks, 3) for sid, toks in seqs.items()])
        assert [len(d) for d in drafts] == [3, 3, 0]  # not all freed and re-read each pass
        assert drafts[:2] == [greedy_continuation(other, seqs[sid], 3) for sid in "ab"]
        assert set(drafter.held) == {"a", "b"}
        for sid, d in zip("ab", drafts):
            seqs[sid] += d[:1] + [9]
    drafter.release(["a"])  # a finished: its room goes to c
    assert [len(d) for d in drafter.propose([(sid, seqs[sid], 3) for sid in "bc"])] == [3, 3]


def test_release_frees_the_caches(other: Transformer) -> None:
    drafter = ModelDrafter(other)
    drafter.propose([("a", [1, 2, 3], 2), ("b", [4, 5], 2)])
    drafter.release(["a"])
    assert "a" not in drafter.held and "a" not in drafter.cache and "b" in drafter.cache
