"""`models.generate_local`, the single-process reference: greedy, EOS and stop strings. No Ray."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import Batch, Transformer, generate_local, load_model

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], [200]]


class CharTokenizer:
    """A stand-in tokenizer: token t is one letter (enough for stop strings)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("A") for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("A") + t % 26) for t in ids)


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Transformer:
    return load_model(tiny_ckpt, dtype="float64")


def greedy_by_hand(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Argmax over the whole sequence recomputed every step, with a fresh cache (no batching)."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor(seq), Batch.build(["s"], [0], [len(seq)]), model.new_cache())
        seq.append(int(logits[0].argmax()))
    return seq[len(prompt):]


def test_generate_is_a_method_of_the_class() -> None:
    assert "generate" in vars(Transformer)


def test_greedy_equals_generate_and_a_hand_loop(model: Transformer) -> None:
    outs = generate_local(model, PROMPTS, max_new_tokens=10, ignore_eos=True)
    by_method = model.generate(PROMPTS, 10, ignore_eos=True)
    assert [o.token_ids for o in outs] == [o.token_ids for o in by_method]
    assert [o.token_ids for o in outs] == [greedy_by_hand(model, p, 10) for p in PROMPTS]
    assert all(o.finish_reason == "length" and o.usage["completion_tokens"] == 10 for o in outs)
    assert generate_local(model, PROMPTS[0], 10, ignore_eos=True)[0].token_ids == outs[0].token_ids  # one prompt


def test_ignore_eos_is_honoured(model: Transformer) -> None:
    ref = generate_local(model, PROMPTS[0], 8, ignore_eos=True)[0].token_ids
    eos, cfg = ref[2], model.cfg
    model.cfg = replace(cfg, eos_ids=(eos,))  # the third greedy token is now EOS
    try:
        stopped = generate_local(model, PROMPTS[0], 8)[0]
        kept = generate_local(model, PROMPTS[0], 8, ignore_eos=True)[0]
    finally:
        model.cfg = cfg
    assert stopped.finish_reason == "stop" and stopped.token_ids == ref[:ref.index(eos)]
    assert kept.finish_reason == "length" and kept.token_ids == ref


def test_stop_strings_are_honoured(model: Transformer) -> None:
    model.tokenizer = CharTokenizer()
    try:
        full = generate_local(model, "FRANCE", 12, ignore_eos=True)[0]
        stop = full.text[4:6]
        cut = generate_local(model, "FRANCE", 12, ignore_eos=True, stop=[stop])[0]
    finally:
        model.tokenizer = None
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)] and stop not in cut.text
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
