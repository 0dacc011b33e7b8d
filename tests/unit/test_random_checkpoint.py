"""The benches' random checkpoint: transformers loads it, and meshpipe's model gives its logits."""

from __future__ import annotations

from pathlib import Path

import torch

from models import Batch, load_model
from models.random_checkpoint import save_random_llama


def test_transformers_and_meshpipe_agree_on_the_random_checkpoint(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    path = save_random_llama(tmp_path / "r", n_layers=3, dim=64, n_heads=4, n_kv_heads=2, hidden=96, vocab=128,
                             init=0.3, dtype=torch.float64, seed=3)
    ids = [5, 9, 2, 77, 31, 4]
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]  # (T, V)
    model = load_model(path, dtype="float64")
    cache = model.new_cache()
    got = model(torch.tensor(ids), Batch.build(["s"], [0], [len(ids)]), cache)  # logits at the last position
    assert (got[-1] - want[-1]).abs().max().item() < 1e-4  # transformers computes RoPE in float32
    greedy = model.generate([ids], max_new_tokens=6, ignore_eos=True)[0].token_ids
    out = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy == out[0, len(ids):].tolist()


def test_tied_and_sizes(tmp_path: Path) -> None:
    path = save_random_llama(tmp_path / "t", n_layers=2, tie=True)
    model = load_model(path, dtype="float32")
    assert model.cfg.n_layers == 2 and model.cfg.tie_embeddings
