"""Files a user (or an attacker) supplies: model configs, GGUF metadata, safetensors shards, tokenizers,
chat templates, topology YAML and deploy options. Each broken or hostile input is a typed error that
names it, refused before any large allocation or unbounded loop. No Ray."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from models.config import MAX_HEAD_DIM, MAX_LAYERS, ModelConfig
from models.errors import ConfigError, InvalidRequestError
from models.gguf_file import MAX_ARRAY_ITEMS, GGUFFile
from models.loading import clear_gguf_cache, load_state_dict, read_config
from models.rope import RopeScaling
from models.tokenizer import Tokenizer, load_tokenizer
from tests.checkpoints import make_tiny_llama
from topology.errors import TopologyError
from topology.graph import Topology


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("sharded") / "m", n_layers=2, vocab=64, sharded=True)


@pytest.fixture()
def folder(sharded: Path, tmp_path: Path) -> Path:
    """A copy of the sharded checkpoint with a word-level tokenizer.json."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    out = tmp_path / "m"
    shutil.copytree(sharded, out)
    Backend(WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(out / "tokenizer.json"))
    return out


def write_gguf(path: Path, meta: dict[str, tuple[str, Any]]) -> Path:
    """A GGUF of `meta` ({key: (gguf-py's add_ kind, value)}) and one small tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in meta.items():
        getattr(w, f"add_{kind}")(key, value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    clear_gguf_cache()
    return path


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **changes}))


# --------------------------------------------------------------------------- model configs


def test_a_gguf_with_zero_heads_is_a_config_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "h0.gguf", {
        "llama.attention.head_count": ("uint32", 0), "llama.embedding_length": ("uint32", 8),
        "llama.block_count": ("uint32", 1), "llama.feed_forward_length": ("uint32", 8)})
    with pytest.raises(ConfigError, match="h0.gguf: not a readable model config"):  # was a ZeroDivisionError
        read_config(path)


def test_a_deeply_nested_config_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):  # was a RecursionError
        read_config(tmp_path)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("changes, match", [
    ({"head_dim": 1 << 22}, "at most"),  # RoPE tables of 2048 x 2**22 float64: 64 GiB on every stage
    ({"head_dim": 9}, "must be even"),  # RoPE tables 10 wide for 9-wide heads
    ({"num_hidden_layers": 10**9}, "layers meshpipe supports"),  # load_stage listed 10**9 layers' keys
    ({"rope_theta": 1.0, "rope_scaling": YARN}, "above 1 for YaRN"),
])
def test_config_sizes_that_would_build_huge_or_broken_tables_are_refused(
        folder: Path, changes: dict, match: str) -> None:
    edit_json(folder / "config.json", **changes)
    with pytest.raises(ConfigError, match=match):
        read_config(folder)


def test_model_config_bounds() -> None:
    with pytest.raises(ConfigError, match="must be even"):
        ModelConfig(dim=36, n_heads=4, n_kv_heads=2)
    with pytest.raises(ConfigError, match="at most"):
        ModelConfig(head_dim_override=MAX_HEAD_DIM + 2)
    with pytest.raises(ConfigError, match="layers meshpipe supports"):
        ModelConfig(n_layers=MAX_LAYERS + 1)
    with pytest.raises(ConfigError, match="above 1 for YaRN"):  # was a ZeroDivisionError building the tables
        ModelConfig(rope_theta=1.0, rope_scaling=RopeScaling("yarn", factor=4.0, original_max_positions=64))
    ModelConfig(head_dim_override=MAX_HEAD_DIM, n_layers=MAX_LAYERS)  # the bounds themselves are fine


# --------------------------------------------------------------------------- GGUF metadata


def test_a_huge_metadata_array_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    n = MAX_ARRAY_ITEMS + 1  # as a list: ~10x the file's bytes (a 4 GB array would be a 40 GB list)
    key = b"tokenizer.ggml.token_type"
    path = tmp_path / "big.gguf"
    with open(path, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key)
        fh.write(struct.pack("<IIQ", 9, 0, n) + b"\x01" * n)  # an array of n uint8
    f = GGUFFile(path)  # opening still skips it
    with pytest.raises(ValueError, match="metadata array of"):
        f.get("tokenizer.ggml.token_type")


# --------------------------------------------------------------------------- safetensors checkpoints


def test_a_hugging_face_cache_snapshot_with_symlinked_shards_loads(sharded: Path, tmp_path: Path) -> None:
    # the hub's layout: snapshots/<rev>/<shard> -> ../../blobs/<hash> (was refused as "outside the folder")
    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        blob = "hash-" + f.name.replace(".", "_")  # no .safetensors suffix either
        shutil.copy(f, blobs / blob)
        os.symlink(f"../../blobs/{blob}", snapshot / f.name)
    state = load_state_dict(snapshot, read_config(snapshot), [0, 1], embed=True, head=True)
    assert "layers.1.attention.wq.weight" in state


@pytest.mark.parametrize("shard", ["a\x00.safetensors", "..\\x.safetensors", "C:x.safetensors",
                                   "sub/../../x.safetensors"])
def test_a_shard_name_is_checked_as_written(folder: Path, shard: str) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="is not a .safetensors file in"):  # NUL was a bare ValueError
        load_state_dict(folder, read_config(folder), [0], embed=True, head=False)


def test_a_corrupt_or_missing_shard_is_a_config_error(folder: Path) -> None:
    cfg = read_config(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[0].write_bytes(b"\xff" * 8 + b"{}")  # a header length past the file
    with pytest.raises(ConfigError, match="not a readable safetensors file"):  # was a SafetensorError
        load_state_dict(folder, cfg, [0, 1], embed=True, head=True)
    shards[0].unlink()
    with pytest.raises(ConfigError, match="is missing"):  # was a FileNotFoundError
        load_state_dict(folder, cfg, [0, 1], embed=True, head=True)


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("file, content", [
    ("tokenizer_config.json", "{bad"),  # JSONDecodeError
    ("tokenizer_config.json", "[1]"),  # AttributeError
    ("tokenizer_config.json", json.dumps({"eos_token": {"content": 7}})),  # TypeError
    ("tokenizer_config.json", json.dumps({"chat_template": 5})),  # TypeError on the first chat request
    ("generation_config.json", json.dumps({"eos_token_id": "x"})),  # ValueError
    ("generation_config.json", b"\xff\xfe{"),  # UnicodeDecodeError
])
def test_a_broken_tokenizer_folder_is_a_config_error(folder: Path, file: str, content: str | bytes) -> None:
    (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=str(folder)):
        load_tokenizer(folder)


def test_a_negative_special_token_id_is_a_config_error(folder: Path) -> None:
    edit_json(folder / "config.json", bos_token_id=-1)  # was an OverflowError on every chat request
    with pytest.raises(ConfigError, match="not token ids"):
        load_tokenizer(folder)


@pytest.mark.parametrize("meta", [
    {},  # no token list
    {"tokenizer.ggml.tokens": ("array", [1, 2, 3])},  # ints
    {"tokenizer.ggml.tokens": ("array", ["a", "b"]),
     "tokenizer.ggml.merges": ("array", ["a c"])},  # a bare Exception
    {"tokenizer.ggml.tokens": ("array", ["a", "b"]), "tokenizer.ggml.bos_token_id": ("int32", -1)},
])
def test_a_broken_gguf_tokenizer_is_a_config_error(tmp_path: Path, meta: dict) -> None:
    path = write_gguf(tmp_path / "t.gguf", {"tokenizer.ggml.model": ("string", "gpt2"), **meta})
    with pytest.raises(ConfigError, match="t.gguf"):
        load_tokenizer(path)


# --------------------------------------------------------------------------- chat templates


def _render(template: str, **kwargs: Any) -> str:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return Tokenizer(backend, chat_template=template).apply_chat_template(
        [{"role": "user", "content": "hi"}], **kwargs)


@pytest.mark.parametrize("template", ["{{ 1/0 }}", "{{ 'a' + 1 }}"])
def test_a_chat_template_bug_is_an_invalid_request(template: str) -> None:
    with pytest.raises(InvalidRequestError, match="failed on these messages"):  # was a bare error from jinja
        _render(template)


# Each just past its bound, so the old code computed it (quickly) instead of refusing; 10x further they
# allocated gigabytes or ran for hours.
@pytest.mark.parametrize("template", [
    "{{ 9 ** 100000 }}",
    "{% set n = 9 %}{{ n ** (n * 10000) }}",
    "{% set ns = namespace(x=3) %}{% for i in range(22) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "{{ ('a' * 33554432)|length }}",
    "{{ ''.ljust(2000000)|length }}",
    "{{ ('%02000000d' % 1)|length }}",
    "{{ ('%*d' % (2000000, 1))|length }}",
    "{{ ('a'|center(2000000))|length }}",
    "{% for i in range(1100) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
    "{{ f('ab', 24) }}",
    "{% set s = 'a' * 1000000 %}{% for i in range(70) %}{{ s }}{% endfor %}",
])
def test_a_chat_template_that_would_run_away_is_refused(template: str) -> None:
    with pytest.raises(InvalidRequestError, match="no chat format needs that"):
        _render(template)


def test_a_chat_template_nested_too_deeply_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):  # was a RecursionError
        _render("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}")


def test_a_request_cannot_swap_in_an_unbounded_range() -> None:
    with pytest.raises(InvalidRequestError, match="range"):
        _render("{% for i in range(1100) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", range=range)


def test_ordinary_template_arithmetic_still_renders() -> None:
    template = ("{% for m in messages %}{{ '%s: %s' % (m.role, m.content) }}{{ '-' * 3 }}{% endfor %}"
                "{% set ns = namespace(n=0) %}{% for i in range(10) %}{% set ns.n = ns.n + i %}{% endfor %}"
                "{{ ns.n }} {{ 2 ** 10 }} {{ 'x'|center(5) }}")
    assert _render(template) == "user: hi---45 1024   x  "


# --------------------------------------------------------------------------- topology and deploy options


def test_a_topology_claiming_a_billion_gpus_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("nodes:\n  a: {gpus: 1000000000}\n")  # gpus_from_topology listed every one
    with pytest.raises(TopologyError, match="GPUs in all"):
        Topology.from_yaml(path)


def test_a_deeply_nested_topology_yaml_is_a_topology_error(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("nodes: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(TopologyError, match="nested too deeply"):  # was a RecursionError
        Topology.from_yaml(path)


def test_autoscaling_options_with_non_text_keys_are_a_config_error() -> None:
    from actors.config import DeployConfig

    with pytest.raises(ConfigError, match="autoscaling"):  # was a TypeError
        DeployConfig.of(autoscaling={1: 2})
