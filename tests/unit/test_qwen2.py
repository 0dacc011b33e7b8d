"""Qwen2 (a Llama with q/k/v biases) against transformers' Qwen2ForCausalLM: HF folders, GGUF, stages,
fused projections, LoRA export, saving. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actors.layout import partition
from models import Batch, ConfigError, load_model, load_stage
from models.lora import LoraConfig, apply_lora, merged_state_dict
from models.loading import read_config, save_hf
from tests.checkpoints import make_tiny_gguf, make_tiny_llama
from tests.support import last_logits

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12], list(range(30, 71)), [200]]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("qwen2") / "hf", n_layers=3, qwen2=True, tie=True, seed=3)


@pytest.fixture(scope="module")
def hf_qwen2(qwen2: Path):  # noqa: ANN201
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(qwen2, dtype=torch.float32).eval()


def test_logits_and_greedy_tokens_equal_transformers(qwen2: Path, hf_qwen2) -> None:  # noqa: ANN001
    cfg = read_config(qwen2)
    assert cfg.qkv_bias and cfg.tie_embeddings
    model = load_model(qwen2, dtype="float32")
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = hf_qwen2(torch.tensor([prompt])).logits[0, -1]
        assert (last_logits(model, prompt) - ref).abs().max().item() < 1e-4
    outs = model.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    for prompt, out in zip(PROMPTS, outs):
        ref = hf_qwen2.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_the_biases_are_what_makes_them_equal(qwen2: Path, hf_qwen2) -> None:  # noqa: ANN001
    model = load_model(qwen2, dtype="float32")
    for layer in model.layers.values():
        layer.attention.wk.bias.data.zero_()
    with torch.no_grad():
        ref = hf_qwen2(torch.tensor([PROMPTS[2]])).logits[0, -1]
    assert (last_logits(model, PROMPTS[2]) - ref).abs().max().item() > 1e-2


def test_fused_projections_carry_the_biases(qwen2: Path) -> None:
    plain = load_model(qwen2, dtype="float64")
    fused = load_model(qwen2, dtype="float64")
    fused.fuse_linears(True)
    for prompt in PROMPTS:
        a, b = last_logits(plain, prompt), last_logits(fused, prompt)
        assert (a - b).abs().max().item() < 1e-10
    attn = fused.layers["0"].attention
    assert attn.wqkv.bias is not None and attn.wq.bias.data_ptr() == attn.wqkv.bias.data_ptr()  # held once


@pytest.mark.parametrize("num_stages", [2, 3])
def test_stages_chained_equal_the_whole_model(qwen2: Path, num_stages: int) -> None:
    cfg = read_config(qwen2)
    specs = partition(cfg, num_stages)
    stages = [load_stage(qwen2, s.layers, "float64", embed=s.embed, head=s.head) for s in specs]
    whole = load_model(qwen2, dtype="float64")
    prompt = PROMPTS[2]
    x: torch.Tensor = torch.tensor(prompt)
    b = Batch.build(["s"], [0], [len(prompt)])
    with torch.no_grad():
        for stage in stages:
            x = stage(x, b, stage.new_cache())
    assert (x[0] - last_logits(whole, prompt)).abs().max().item() < 1e-10


def test_a_qwen2_gguf_equals_the_folder(qwen2: Path, tmp_path: Path) -> None:
    """llama.cpp stores qwen2's q/k rows as Hugging Face does (no interleaving) and its biases as
    `attn_q.bias` ...; its metadata under `qwen2.` keys."""
    path = make_tiny_gguf(tmp_path / "q.gguf", qwen2, architecture="qwen2")
    cfg = read_config(path)
    folder = read_config(qwen2)
    assert cfg.qkv_bias and cfg.norm_eps == pytest.approx(folder.norm_eps, rel=1e-6)  # a float32 there
    assert cfg == folder.replace(max_seq_len=cfg.max_seq_len, eos_ids=cfg.eos_ids, bos_id=cfg.bos_id,
                                 norm_eps=cfg.norm_eps)
    a, b = load_model(path, dtype="float32"), load_model(qwen2, dtype="float32")
    assert (last_logits(a, PROMPTS[2]) - last_logits(b, PROMPTS[2])).abs().max().item() < 1e-5


def test_saved_and_lora_merged_folders_load_in_transformers(qwen2: Path, hf_qwen2, tmp_path: Path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model = load_model(qwen2, dtype="float32")
    assert apply_lora(model, LoraConfig(targets=("q_proj", "k_proj", "v_proj")), seed=0) == 9
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.normal_(0, 0.05)  # a trained adapter: the merge must change the weights
    state = merged_state_dict(model)
    assert not any(".base." in k or "lora_" in k for k in state) and "layers.0.attention.wq.bias" in state
    out = save_hf(tmp_path / "merged", model.cfg, state)
    assert read_config(out) == model.cfg
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["architectures"] == ["Qwen2ForCausalLM"]
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = last_logits(model, PROMPTS[2])
        ref = theirs(torch.tensor([PROMPTS[2]])).logits[0, -1]
        base = hf_qwen2(torch.tensor([PROMPTS[2]])).logits[0, -1]
    assert (ours - ref).abs().max().item() < 1e-4 and (ours - base).abs().max().item() > 1e-3


def test_a_sliding_window_caps_the_context_only_when_used(qwen2: Path, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(qwen2, tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(sliding_window=16, use_sliding_window=False)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert read_config(folder).max_seq_len == cfg["max_position_embeddings"]
    cfg["use_sliding_window"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    assert read_config(folder).max_seq_len == 16
    cfg["sliding_window"] = "16"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="sliding_window='16' must be a positive integer"):
        read_config(folder)


def test_a_mistral_with_a_sliding_window_equals_transformers_within_it(tmp_path: Path) -> None:
    """Mistral 7B v0.1's 4096-position window over a 32768 context: within the window its attention is
    full attention, so the context is capped there and every token equals transformers' Mistral."""
    from transformers import MistralForCausalLM

    from models import PromptTooLongError

    folder = make_tiny_llama(tmp_path / "mistral", n_layers=2, seed=4)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=48)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert read_config(folder).max_seq_len == 48
    hf = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load_model(folder, dtype="float32")
    prompt = PROMPTS[2]  # 41 tokens: 7 more fill the window
    out = model.generate([prompt], max_new_tokens=7, ignore_eos=True)[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref and out.finish_reason == "length"
    with pytest.raises(PromptTooLongError):
        model.generate([list(range(1, 50))], max_new_tokens=1)


def test_the_gguf_pre_tokenizer_splits_as_transformers_qwen2_tokenizer() -> None:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from models.tokenizer import _QWEN2_SPLIT

    assert _QWEN2_SPLIT == PRETOKENIZE_REGEX
