"""SmolLM2 through `models` against transformers' LlamaForCausalLM on the same GGUF. No Ray."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models import Batch, Transformer

pytestmark = pytest.mark.smollm2

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_logits_match_transformers_within_1e_3(smollm2: Transformer, hf_smollm2_model: Any) -> None:
    tok = smollm2.tokenizer
    worst = 0.0
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = hf_smollm2_model(torch.tensor([ids])).logits[0]  # (T, vocab)
        cache = smollm2.new_cache()
        # prefill, then decode 4 steps feeding the reference's greedy tokens, comparing each step
        ours = smollm2(torch.tensor(ids), Batch.build(["s"], [0], [len(ids)]), cache)[0]
        worst = max(worst, (ours - ref[-1]).abs().max().item())
        seq = list(ids)
        for _ in range(4):
            seq.append(int(ref[-1].argmax()))
            with torch.no_grad():
                ref = hf_smollm2_model(torch.tensor([seq])).logits[0]
            ours = smollm2(torch.tensor(seq[-1:]), Batch.build(["s"], [len(seq) - 1], [1]), cache)[0]
            worst = max(worst, (ours - ref[-1]).abs().max().item())
    assert worst <= 1e-3, f"max abs logit diff {worst:.2e}"


def test_greedy_matches_transformers_generate(smollm2: Transformer, hf_smollm2_model: Any) -> None:
    tok = smollm2.tokenizer
    ours = smollm2.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    for text, out in zip(PROMPTS, ours):
        ids = tok.encode(text)
        ref = hf_smollm2_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                        min_new_tokens=10, pad_token_id=2)[0, len(ids):].tolist()
        assert out.token_ids == ref


def test_raw_completion_names_paris(smollm2: Transformer) -> None:
    out = smollm2.generate("The capital of France is", max_new_tokens=8)[0]
    assert "Paris" in out.text


def test_chat_answers_sensibly(smollm2: Transformer) -> None:
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = smollm2.generate(prompt, max_new_tokens=32)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"  # it ends its answer with <|im_end|>
    assert 2 not in out.token_ids  # EOS excluded
