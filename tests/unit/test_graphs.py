"""Decode steps padded to (batch, blocks) buckets on static buffers (`models.graphs`): the outputs and caches
of eager steps, sequences joining and leaving, padded rows touching no sequence, graphs dropped when the
weights change. On a CPU the padded step runs uncaptured; a GPU test captures and replays. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import Batch, generate_local, load_model
from models.graphs import DecodeGraphs, bucket
from models.loading import load_stage
from models.lora import LoraConfig, apply_lora

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 71)), [200]]


def test_bucket_rounds_up_to_a_power_of_two_within_the_cap() -> None:
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert bucket(40, 48) == 48 and bucket(50, 48) == 50  # capped, never below n


def _script(model: torch.nn.Module, x_of: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Prefills, then decode steps while sequences join (a mixed step) and leave, across block boundaries:
    each step's output and every sequence's cached keys and values at the end. `x_of`: hidden-state inputs
    per step (a middle stage) instead of token ids."""
    cache, out, length = model.new_cache(512), [], {}
    steps: list[tuple[list[str], list[int]]] = [(["a"], [len(PROMPTS[0])])]
    steps += [(["a"], [1])] * 3  # one sequence: bucket (1, 1)
    steps += [(["a", "c"], [1, len(PROMPTS[2])])]  # c joins: a mixed step, eager
    steps += [(["a", "c"], [1, 1])] * 10  # c crosses from 3 to 4 blocks: buckets (2, 4)
    steps += [(["a", "c", "d"], [1, 1, 1])] * 2  # d joins decoding at once (a 1-token prompt): (4, 4), a padded row
    steps += [(["c", "d"], [1, 1])] * 20  # a leaves; c reaches 5 blocks: (2, 8)
    for i, (ids, lengths) in enumerate(steps):
        starts = [length.get(s, 0) for s in ids]
        for s, n in zip(ids, lengths):
            length[s] = length.get(s, 0) + n
        if x_of is not None:
            x = x_of[str(i)]
        else:
            x = torch.tensor([t for s, n, st in zip(ids, lengths, starts)
                              for t in (PROMPTS["a-cd".index(s)] if n > 1 or st == 0 else [3 + st % 50])[:n]])
        out.append(model(x, Batch.build(ids, starts, lengths), cache))
        if i == 16:
            cache.free(["a"])
    kv = {s: cache.export(s, 0) for s in ("c", "d")}
    return out, kv


def test_padded_decode_steps_equal_eager_steps(tiny_ckpt: Path) -> None:
    eager = load_model(tiny_ckpt, dtype="float64")
    padded = load_model(tiny_ckpt, dtype="float64")
    padded.cuda_graphs(True)
    want, want_kv = _script(eager)
    got, got_kv = _script(padded)
    assert all(torch.allclose(w, g, rtol=0, atol=1e-12) for w, g in zip(want, got))
    assert [w.argmax(-1).tolist() for w in want] == [g.argmax(-1).tolist() for g in got]
    for s in want_kv:  # padded rows wrote only their scratch block
        assert all(torch.allclose(want_kv[s][i][j], got_kv[s][i][j], rtol=0, atol=1e-12)
                   for i in want_kv[s] for j in (0, 1))
    stats = padded.graphs.stats()
    assert stats["uncaptured"] == 35 and stats["replays"] == 0 and stats["failed"] is None  # every decode step
    assert sorted(padded.graphs.buckets) == [(1, 1), (2, 4), (2, 8), (4, 4)]


def test_a_middle_stage_pads_hidden_states(tiny_ckpt: Path) -> None:
    """A stage without embedding or head: hidden states in, hidden states out, through the static buffers."""
    first = load_model(tiny_ckpt, dtype="float64")
    first.output = first.norm = None  # the first two layers' hidden states
    del first.layers["2"], first.layers["3"]
    hidden, _ = _script(first)
    x_of = {str(i): h for i, h in enumerate(hidden)}
    eager = load_stage(tiny_ckpt, [2, 3], "float64", embed=False, head=False)
    padded = load_stage(tiny_ckpt, [2, 3], "float64", embed=False, head=False)
    padded.cuda_graphs(True)
    want, _ = _script(eager, x_of)
    got, _ = _script(padded, x_of)
    assert all(torch.allclose(w, g, rtol=0, atol=1e-12) for w, g in zip(want, got))
    assert padded.graphs.stats()["uncaptured"] == 35


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": 7}, {"speculative": 3}])
def test_generate_local_with_padded_steps_gives_the_same_tokens(tiny_ckpt: Path, sampling: dict) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    want = [c.token_ids for c in generate_local(model, PROMPTS, 20, ignore_eos=True, **sampling)]
    model.cuda_graphs(True)
    assert [c.token_ids for c in generate_local(model, PROMPTS, 20, ignore_eos=True, **sampling)] == want
    # speculative passes read several positions a sequence (`logits_at`): eager, like prefills
    assert (model.graphs.stats()["uncaptured"] > 0) == ("speculative" not in sampling)


def test_default_is_eager_and_none_means_cuda_only(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float32")
    assert model.graphs is None  # generate_local's baseline stays eager
    model.cuda_graphs(None)
    model.generate(PROMPTS, max_new_tokens=4)
    assert model.graphs.stats()["uncaptured"] == 0 and not model.graphs.buckets  # a CPU: eager steps
    model.cuda_graphs(False)
    assert model.graphs is None


def test_replaced_weights_drop_the_buckets(tiny_ckpt: Path) -> None:
    """Graphs read the weights where they were captured: loading, moving or wrapping (LoRA) weights drops them,
    and the steps after see the new weights."""
    model = load_model(tiny_ckpt, dtype="float64")
    model.cuda_graphs(True)
    model.generate(PROMPTS, max_new_tokens=4)
    assert model.graphs.buckets
    model.load_weights({k: v * 1.01 for k, v in model.state_dict().items()})
    assert not model.graphs.buckets
    scaled = load_model(tiny_ckpt, dtype="float64")
    scaled.load_weights({k: v * 1.01 for k, v in scaled.state_dict().items()})
    assert [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)] == \
        [c.token_ids for c in scaled.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    model.to(torch.float32)
    assert not model.graphs.buckets
    model.generate(PROMPTS, max_new_tokens=4)
    assert model.graphs.buckets
    apply_lora(model, LoraConfig(r=4, alpha=8), seed=3)
    assert not model.graphs.buckets
    for m in model.modules():  # nonzero adapters, so the plain linears' logits would differ
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    padded = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    assert model.graphs.buckets
    model.cuda_graphs(False)
    assert [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)] == padded


def test_a_step_too_large_for_a_bucket_runs_eagerly(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    model.graphs = DecodeGraphs(True, max_batch=2)
    model.generate(PROMPTS, max_new_tokens=4)  # 4 sequences
    assert model.graphs.stats()["uncaptured"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_captured_graphs_replay_the_eager_tokens_on_a_gpu(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float32").to("cuda")
    want = [c.token_ids for c in generate_local(model, PROMPTS, 24, ignore_eos=True)]
    model.cuda_graphs(None)
    assert [c.token_ids for c in generate_local(model, PROMPTS, 24, ignore_eos=True)] == want
    stats = model.graphs.stats()
    assert stats["failed"] is None and stats["graphs"] > 0 and stats["replays"] > 0
    eager = load_model(tiny_ckpt, dtype="float32").to("cuda")
    want, _ = _script(eager)
    got, _ = _script(model)
    assert all(torch.allclose(w, g, atol=1e-4) for w, g in zip(want, got))


def test_generate_local_reuses_the_pool_its_graphs_were_made_for(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    model.cuda_graphs(True)
    first = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]
    cache, buckets = model.graphs.cache, dict(model.graphs.buckets)
    assert [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)] == first
    assert model.graphs.cache is cache and model.graphs.buckets == buckets  # nothing made again
    model.generate(PROMPTS, max_new_tokens=200, ignore_eos=True)  # a larger pool: graphs for it
    assert model.graphs.cache is not cache
