"""The decoder against transformers' LlamaForCausalLM, batching and the KV cache. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.layout import partition
from models import Batch, CacheMissError, load_model, load_stage
from models.loading import read_config


@pytest.fixture(scope="module")
def hf_tiny(tiny_ckpt: Path):  # noqa: ANN201
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_ckpt, torch_dtype=torch.float64).eval()


PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 71)), [200]]


# transformers normalises in float32 even for a float64 model, hence 1e-4 and not 1e-12
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-4), ("float32", 1e-4)])
def test_logits_match_transformers(tiny_ckpt: Path, hf_tiny, dtype: str, tol: float) -> None:  # noqa: ANN001
    model = load_model(tiny_ckpt, dtype=dtype)
    for prompt in PROMPTS:
        ref = hf_tiny(torch.tensor([prompt])).logits[0, -1]
        cache = model.new_cache()
        ours = model(torch.tensor(prompt), Batch.build(["s"], [0], [len(prompt)]), cache)[0]
        assert (ours.double() - ref).abs().max().item() < tol


def test_greedy_matches_transformers_generate(tiny_ckpt: Path, hf_tiny) -> None:  # noqa: ANN001
    model = load_model(tiny_ckpt, dtype="float64")
    outs = model.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)  # one ragged batch
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_tiny.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.usage == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                             "total_tokens": len(prompt) + 12}
        assert out.finish_reason == "length"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_norm_and_rope_equal_transformers_bit_for_bit(dtype: torch.dtype) -> None:
    """The fused RMSNorm and the one-roll RoPE give exactly transformers' Llama bits (CPU), every dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from models.config import ModelConfig
    from models.model import RMSNorm, apply_rope, rope_tables

    torch.manual_seed(0)
    ours, ref = RMSNorm(576, 1e-5), LlamaRMSNorm(576, eps=1e-5)
    w = (1 + 0.1 * torch.randn(576)).to(dtype)
    ours.weight.data, ref.weight.data = w, w.clone()
    x = (3 * torch.randn(33, 576)).to(dtype)
    if dtype != torch.float64:  # transformers normalises float64 in float32; ours stays in float64
        assert torch.equal(ours(x), ref(x))

    cfg = ModelConfig(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, hidden_dim=64, vocab_size=8, max_seq_len=128)
    cos, sin = rope_tables(cfg)
    pos = torch.randint(0, 128, (40,))
    q, k = torch.randn(40, 9, 64).to(dtype), torch.randn(40, 3, 64).to(dtype)
    c, s = cos[pos].to(dtype)[:, None], sin[pos].to(dtype)[:, None]
    # transformers' tables: plain sin, rotate_half in the function
    plain = torch.cat([-s[..., :32], s[..., 32:]], -1)
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), c[:, 0], plain[:, 0], unsqueeze_dim=0)
    assert torch.equal(apply_rope(q, c, s), rq.transpose(0, 1))
    assert torch.equal(apply_rope(k, c, s), rk.transpose(0, 1))


def test_ragged_batch_equals_one_at_a_time(tiny_ckpt: Path) -> None:
    """Packed prefills of different lengths plus decodes in one step change nothing (float64)."""
    model = load_model(tiny_ckpt, dtype="float64")
    alone = [model.generate(p, max_new_tokens=8, ignore_eos=True)[0].token_ids for p in PROMPTS]
    together = [o.token_ids for o in model.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)]
    assert together == alone


def test_sequences_join_and_leave_between_steps(tiny_ckpt: Path) -> None:
    """Continuous batching: a sequence joins mid-way while another decodes, and one leaves."""
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache()
    a, b = PROMPTS[0], PROMPTS[2]
    la = model(torch.tensor(a), Batch.build(["a"], [0], [len(a)]), cache)
    ta = int(la.argmax())
    # step 2: a decodes one token while b prefills 41 tokens, packed in one step
    x = torch.tensor([ta, *b])
    both = model(x, Batch.build(["a", "b"], [len(a), 0], [1, len(b)]), cache)
    ref = model.new_cache()
    ra = model(torch.tensor([*a, ta]), Batch.build(["a"], [0], [len(a) + 1]), ref)
    rb = model(torch.tensor(b), Batch.build(["b"], [0], [len(b)]), ref)
    assert torch.allclose(both[0], ra[0], atol=1e-10) and torch.allclose(both[1], rb[0], atol=1e-10)
    cache.free(["a"])
    assert "a" not in cache and cache.tokens_held() == len(b)
    # a new sequence reuses a's slot and sees none of a's keys
    c = [9, 8, 7]
    lc = model(torch.tensor(c), Batch.build(["c"], [0], [3]), cache)
    fresh = model(torch.tensor(c), Batch.build(["c"], [0], [3]), model.new_cache())
    assert torch.allclose(lc, fresh, atol=1e-10)


def test_cache_rejects_a_gap(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    cache = model.new_cache()
    with pytest.raises(CacheMissError, match="rebuild"):
        model(torch.tensor([1]), Batch.build(["new"], [5], [1]), cache)


def test_cache_grows_past_its_first_allocation(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="float64")
    prompts = [[i % 250 + 3] * (40 + i) for i in range(9)]  # > 4 slots, > 64 positions
    alone = [model.generate(p, max_new_tokens=30, ignore_eos=True)[0].token_ids for p in prompts]
    assert [o.token_ids for o in model.generate(prompts, max_new_tokens=30, ignore_eos=True)] == alone


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_stages_chained_equal_the_whole_model(tiny_tied_ckpt: Path, num_stages: int) -> None:
    """A stage is the model with the pieces it does not own left out; chained they are the model."""
    cfg = read_config(tiny_tied_ckpt)
    stages = [load_stage(tiny_tied_ckpt, spec.layers, "float64", embed=spec.embed, head=spec.head)
              for spec in partition(cfg, num_stages=num_stages)]
    assert stages[0].tok_embeddings is not None and stages[-1].output is not None
    assert all(s.tok_embeddings is None for s in stages[1:]) and all(s.output is None for s in stages[:-1])
    whole = load_model(tiny_tied_ckpt, dtype="float64")
    prompt = torch.tensor(PROMPTS[0])
    b = Batch.build(["s"], [0], [len(prompt)])
    x = prompt
    for s in stages:
        x = s(x, b, s.new_cache())
    assert torch.allclose(x, whole(prompt, b, whole.new_cache()), atol=1e-10)
    own = [sorted(k for k in s.state_dict() if k.startswith("layers.")) for s in stages]
    assert sum(len(o) for o in own) == len(whole.layers) * 9  # each layer in exactly one stage


def test_bfloat16_runs(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, dtype="bfloat16")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert len(model.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)[0].token_ids) == 4


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_a_batch_moves_to_a_device_as_one_tensor(device: str) -> None:
    """`Batch.to` copies build's one tensor (one host-to-device copy a step, not six) and slices it there."""
    b = Batch.build(["a", "b", "c"], [3, 0, 7], [1, 4, 2])
    m = b.to(device)
    assert m.packed is not None and m.packed.device.type == device and m.host == b.host
    for name in ("starts", "lengths", "last_token", "token_seq", "token_t", "positions"):
        got, want = getattr(m, name), getattr(b, name)
        assert got.device.type == device and got.shape == want.shape, name
        if device != "meta":
            assert got.tolist() == want.tolist(), name
    assert m.span() == b.span() == (3, 4, 9)


def test_a_nan_sequence_ends_alone_and_leaves_no_nan_in_the_pool(tmp_path: Path) -> None:
    """A sequence whose activations turn NaN ends with NonFiniteLogitsError; the sequences batched with it
    and those later given its blocks compute as without it (masked reads of another sequence's NaN keys,
    through block 0's padding or a reused block's stale tail, made them NaN too: 0 x NaN)."""
    from models import NonFiniteLogitsError
    from tests.checkpoints import make_tiny_llama, poison_token
    from tests.support import last_logits

    folder = poison_token(make_tiny_llama(tmp_path / "llama", n_layers=2), 7)
    model = load_model(folder, dtype="float32")
    bad, good = [5, 9, 11] * 13 + [7], [3, 4, 5]
    cache = model.new_cache()

    both = model(torch.tensor(bad + good), Batch.build(["bad", "good"], [0, 0], [len(bad), len(good)]), cache)
    assert torch.isnan(both[0]).any() and torch.allclose(both[1], last_logits(model, good), atol=1e-5)
    cache.free(["bad", "good"])
    prompts = [list(range(20, 20 + n)) for n in (3, 20, 50)]  # in the bad sequence's freed blocks, padded
    outs = model(torch.tensor([t for p in prompts for t in p]),
                 Batch.build(["a", "b", "c"], [0, 0, 0], [len(p) for p in prompts]), cache)
    for out, prompt in zip(outs, prompts):
        assert torch.allclose(out, last_logits(model, prompt), atol=1e-5)
    with pytest.raises(NonFiniteLogitsError, match="logits after 40 tokens were NaN"):
        model.generate([good, bad], max_new_tokens=4, ignore_eos=True)
