"""Tokenizers and chat templates from GGUF metadata and HF folders. No Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.errors import ConfigError, InvalidRequestError
from models.tokenizer import Tokenizer, load_tokenizer
from tests.checkpoints import make_tiny_gguf, make_tiny_llama, smollm2_gguf_path

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

STRINGS = [
    "Hello world",
    "12345",
    " 12345",
    "The year 2024 has 365 days.",
    "x=3.14159 and 100,000 $5",
    "héllo wörld 你好 🤖 Ελληνικά",
    "  leading spaces",
    " ",
    "a  b   c",
    "\n\nnew lines\tand tabs\r\n",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square",
    "price  $ 5",
]

# Whitespace right before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own
# tokenizer.json: Digits(individual) then ByteLevel) splits digits off first, so the spaces form
# one piece; transformers 5.23's GGUF tokenizer has no "smollm" entry and uses GPT-2's regex,
# which gives " " + " 1" instead. We follow llama.cpp / HF here.
DIGIT_WHITESPACE = {
    "  1": ["ĠĠ", "1"],
    "x  12": ["x", "ĠĠ", "1", "2"],
    "   3": ["ĠĠĠ", "3"],
    "a\n\n1": ["a", "ĊĊ", "1"],
    "Total:   42 items": ["Total", ":", "ĠĠĠ", "4", "2", "Ġitems"],
}


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    tok = load_tokenizer(smollm2_gguf_path())
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def hf_smol() -> Any:
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.smollm2
def test_smollm2_special_ids(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.eos_ids == (2,)
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"
    assert not smol.add_bos
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|endoftext|>") == [0]


@pytest.mark.smollm2
@pytest.mark.parametrize("text", STRINGS)
def test_smollm2_matches_transformers(smol: Tokenizer, hf_smol: Any, text: str) -> None:
    assert smol.encode(text) == hf_smol.encode(text, add_special_tokens=False)


@pytest.mark.smollm2
def test_smollm2_digits_split_individually(smol: Tokenizer) -> None:
    ids = smol.encode("12345")
    assert [smol.backend.id_to_token(i) for i in ids] == list("12345")
    for text, pieces in DIGIT_WHITESPACE.items():
        assert [smol.backend.id_to_token(i) for i in smol.encode(text)] == pieces, text


@pytest.mark.smollm2
def test_transformers_gguf_tokenizer_differs_on_whitespace_before_digits(hf_smol: Any) -> None:
    """Documents the known divergence; if transformers fixes it, this test tells us."""
    ids = hf_smol.encode("  1", add_special_tokens=False)
    assert hf_smol.convert_ids_to_tokens(ids) == ["Ġ", "Ġ", "1"]


@pytest.mark.smollm2
@pytest.mark.parametrize("text", STRINGS + list(DIGIT_WHITESPACE))
def test_smollm2_round_trip(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text)) == text


@pytest.mark.smollm2
def test_smollm2_decode_skips_specials_on_request(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert smol.decode(ids, skip_special_tokens=True) == "assistant\nHi"


@pytest.mark.smollm2
def test_smollm2_chat_template(smol: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smol.apply_chat_template(messages)
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = smol.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == text[: -len("<|im_start|>assistant\n")]
    custom = smol.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages])
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert SMOLLM2_SYSTEM not in custom
    assert smol.encode(text)[:1] == [1]


@pytest.mark.smollm2
def test_smollm2_chat_template_matches_transformers(smol: Tokenizer, hf_smol: Any) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    ours = smol.apply_chat_template(messages)
    theirs = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


@pytest.mark.smollm2
def test_hf_folder_tokenizer(smol: Tokenizer, tmp_path: Path) -> None:
    """An HF folder with tokenizer.json behaves like the GGUF it was saved from."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "bos_token_id": 1,
                "eos_token_id": 2,
                "vocab_size": 49152,
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            }
        )
    )
    smol.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>"},
                "add_bos_token": False,
                "chat_template": smol.chat_template,
            }
        )
    )
    tok = load_tokenizer(folder)
    assert tok is not None
    assert tok.eos_ids == (2,) and tok.bos_id == 1 and not tok.add_bos
    for text in STRINGS + list(DIGIT_WHITESPACE):
        assert tok.encode(text) == smol.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == smol.apply_chat_template(messages)

    # chat_template.jinja wins over tokenizer_config.json, like transformers
    (folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    jinja = load_tokenizer(folder)
    assert jinja is not None and jinja.apply_chat_template(messages) == "<|im_start|>Hi"


def test_hf_folder_without_tokenizer_json(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "tiny", n_layers=1)
    assert load_tokenizer(folder) is None


def test_an_unreadable_tokenizer_json_is_a_config_error(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "tiny", n_layers=1)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer.json is not a tokenizer"):
        load_tokenizer(folder)


def test_tiny_gguf_byte_tokenizer(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "tiny", n_layers=1)
    tok = load_tokenizer(make_tiny_gguf(tmp_path / "t.gguf", folder))
    assert tok is not None and tok.vocab_size == 256
    text = "héllo 12 ✓"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.chat_template is None
    with pytest.raises(ConfigError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unsupported_gguf_tokenizer(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "tiny", n_layers=1)
    path = make_tiny_gguf(tmp_path / "spm.gguf", folder, tokenizer_model="llama")
    with pytest.raises(ConfigError, match="'llama'"):
        load_tokenizer(path)


def test_template_errors(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    tok = Tokenizer(backend, eos_ids=[1], bos_id=0, chat_template=strict)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"</s>'
    with pytest.raises(InvalidRequestError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    bad = Tokenizer(backend, chat_template="{% for %}")
    with pytest.raises(ConfigError, match="compile"):
        bad.apply_chat_template([])
    # the (immutable) sandbox refuses Python internals and mutating the caller's messages
    evil = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError, match="unsafe"):
        evil.apply_chat_template([])
    mutating = Tokenizer(backend, chat_template="{{ messages.pop() }}")
    with pytest.raises(InvalidRequestError, match="unsafe"):
        mutating.apply_chat_template([{"role": "user", "content": "x"}])


def test_add_bos_from_metadata(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Backend(WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    assert Tokenizer(backend, bos_id=0, add_bos=True).encode("hi hi") == [0, 2, 2]
    assert Tokenizer(backend, bos_id=0, add_bos=False).encode("hi hi") == [2, 2]
