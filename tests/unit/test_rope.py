"""RoPE scaling (linear, Llama 3, YaRN; a GGUF's per-frequency factors) against transformers. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import ConfigError, load_model, load_stage
from models.loading import hf_config_dict, read_config
from models.rope import RopeScaling, attention_factor, from_hf, inv_freq
from tests.checkpoints import make_tiny_gguf, make_tiny_llama
from tests.support import last_logits

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-attention-factor": {**YARN, "attention_factor": 1.3, "beta_fast": 16, "beta_slow": 2},
    "yarn-mscale": {**YARN, "mscale": 0.8, "mscale_all_dim": 0.5},
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256},  # max / orig
    "yarn-untruncated": {**YARN, "truncate": False},
}


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("head_dim", [64, 16])
def test_frequencies_and_attention_factor_equal_transformers(name: str, head_dim: int) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = SCALINGS[name]
    hf = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=1024,
                     rope_parameters={**params, "rope_theta": 10000.0})
    want, want_attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    scaling = from_hf(params, 1024, "config.json")
    got = inv_freq(10000.0, head_dim, scaling)
    torch.testing.assert_close(got.float(), want, rtol=2e-6, atol=0)  # transformers computes in float32
    assert attention_factor(scaling) == pytest.approx(want_attention, rel=1e-12)
    assert not torch.allclose(got, inv_freq(10000.0, head_dim, None))  # it does scale


@pytest.fixture(scope="module", params=["llama3", "yarn", "linear"])
def scaled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    folder = make_tiny_llama(tmp_path_factory.mktemp(request.param) / "llama", n_layers=2,
                             rope=SCALINGS[request.param])
    return request.param, folder


# past the 32 / 64 positions the scalings were "trained" on; no 0 (generate's pad id would mask it)
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(120)]


def test_logits_and_greedy_tokens_equal_transformers(scaled: tuple[str, Path]) -> None:
    from transformers import LlamaForCausalLM

    name, folder = scaled
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load_model(folder, dtype="float32")
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.kind == name
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
        last = last_logits(model, PROMPT)
    assert (last - ref[-1]).abs().max().item() < 1e-4
    plain = load_stage(folder, dtype="float32", config=read_config(folder).replace(rope_scaling=None))
    with torch.no_grad():
        unscaled = last_logits(plain, PROMPT)
    assert (unscaled - ref[-1]).abs().max().item() > 1e-2  # the scaling is what makes them equal
    out = model.generate([PROMPT], max_new_tokens=16, ignore_eos=True)[0].token_ids
    want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(PROMPT):].tolist()
    assert out == want


def test_a_saved_config_reads_back_the_same_scaling(scaled: tuple[str, Path], tmp_path: Path) -> None:
    import json

    _, folder = scaled
    cfg = read_config(folder)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, torch.float32)))
    assert read_config(tmp_path) == cfg
    again = type(cfg).from_dict(cfg.to_dict())  # as it travels to the stage actors
    assert again == cfg and isinstance(again.rope_scaling, RopeScaling)


@pytest.mark.parametrize("name", ["llama3", "linear"])  # llama.cpp's YaRN is not Hugging Face's: refused below
def test_a_llama3_gguf_carries_its_frequency_factors(name: str, tmp_path: Path) -> None:
    """llama.cpp writes Llama 3 scaling as a `rope_freqs` tensor (and linear as metadata): both are read,
    so the GGUF model equals the Hugging Face one (the tensor was once left unread, RoPE unscaled)."""
    folder = make_tiny_llama(tmp_path / "llama", n_layers=2, rope=SCALINGS[name])
    path = make_tiny_gguf(tmp_path / "t.gguf", folder)
    cfg = read_config(path)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == ("factors" if name == "llama3" else "linear")
    a, b = load_model(path, dtype="float32"), load_model(folder, dtype="float32")
    with torch.no_grad():
        la, lb = last_logits(a, PROMPT), last_logits(b, PROMPT)
    assert (la - lb).abs().max().item() < 1e-4


@pytest.mark.parametrize("params,match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
    ({"rope_type": "linear"}, "needs a factor"),
    ({"rope_type": "linear", "factor": -1.0}, "factor=-1.0 must be a finite positive number"),
    ({"rope_type": "linear", "factor": "2"}, "factor='2' must be a number"),
    ({**LLAMA3, "original_max_position_embeddings": None}, "original_max_position_embeddings=None"),
    ({**LLAMA3, "low_freq_factor": 4.0}, "low_freq_factor=4.0 must be below high_freq_factor=4.0"),
    ({**YARN, "beta_fast": float("inf")}, "beta_fast=inf"),
])
def test_bad_scalings_are_refused_by_name(params: dict, match: str, tmp_path: Path) -> None:
    import json

    folder = make_tiny_llama(tmp_path / "llama", n_layers=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = params
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        read_config(folder)


def test_gguf_yarn_and_bad_factor_tensors_are_refused(tmp_path: Path) -> None:
    import gguf

    from models.loading import _gguf_rope
    from models.gguf_file import GGUFFile

    hf = make_tiny_llama(tmp_path / "hf", n_layers=1)
    path = make_tiny_gguf(tmp_path / "t.gguf", hf)
    plain = GGUFFile(path)
    assert _gguf_rope(plain, "llama", 16) is None
    plain.fields["llama.rope.scaling.type"] = gguf.RopeScalingType.YARN.value
    with pytest.raises(ConfigError, match="RoPE scaling 'yarn' is not supported"):
        _gguf_rope(plain, "llama", 16)
    llama3 = GGUFFile(make_tiny_gguf(tmp_path / "l3.gguf", make_tiny_llama(tmp_path / "l3", n_layers=1,
                                                                            rope=LLAMA3)))
    with pytest.raises(ConfigError, match="rope_freqs holds 8 factors for 16 frequencies"):
        _gguf_rope(llama3, "llama", 32)
    with pytest.raises(ConfigError, match="frequency factors must be finite positive"):
        RopeScaling(kind="factors", freq_factors=(1.0, 0.0))
