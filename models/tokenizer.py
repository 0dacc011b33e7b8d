"""Tokenizer and chat template, from a GGUF's metadata or a Hugging Face folder."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import models as tok_models
from tokenizers import Tokenizer as Backend

from models.errors import ConfigError, InvalidRequestError
from models.loading import is_gguf, open_gguf, resolve_source

logger = logging.getLogger(__name__)

_CONTROL = 3  # llama.cpp token types
_USER_DEFINED = 4

# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` values that differ from GPT-2's regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2: digits one at a time
_GPT2_LIKE_PRE = {None, "default", "gpt2", "gpt-2"}


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# A chat template comes with the model file and runs on every chat request: these bound what one can
# make a render do (jinja's sandbox stops Python internals, not `'x' * 10**10`, `n ** n ** n` or loops
# nested over `range(100000)`).
MAX_TEMPLATE_INT = 1 << 20  # largest int argument of a call or filter, repeat count or `**` exponent
MAX_TEMPLATE_VALUE = 1 << 24  # chars (or items) of one value built by `*` or `%`
MAX_TEMPLATE_RANGE = 1 << 20  # items all `range()` calls of one render yield together
MAX_TEMPLATE_OUTPUT = 1 << 26  # chars of one rendered prompt


def _refuse(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(
        f"the chat template {what}: no chat format needs that (replace the model's chat template)")


def _check_args(args: Iterable[Any]) -> None:
    """Refuse an int beyond MAX_TEMPLATE_INT (a width, a count) or a value beyond MAX_TEMPLATE_VALUE
    (a macro calling itself on `s ~ s` doubles it each time)."""
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_INT:
            raise _refuse(f"passes {a} to a call (at most {MAX_TEMPLATE_INT})")
        if isinstance(a, (str, list, tuple)) and len(a) > MAX_TEMPLATE_VALUE:
            raise _refuse(f"passes a value of {len(a)} items to a call (at most {MAX_TEMPLATE_VALUE})")


class _BoundedNamespace(jinja2.utils.Namespace):
    """`namespace()`, whose attributes (assigned in a loop, so they can grow each turn) stay bounded."""

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(value, (str, list, tuple)):  # (ints: `*` and `**` bound them)
            _check_args([value])
        super().__setitem__(name, value)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, whose calls, filters, `*`, `**` and `%` refuse sizes no chat format needs."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's
        _check_args([*args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        bits = [abs(x).bit_length() for x in (left, right) if isinstance(x, int)]
        if operator == "**" and isinstance(right, (int, float)) and (
                abs(right) > 64 or len(bits) == 2 and bits[0] * abs(right) > 1 << 16):
            raise _refuse(f"raises to the power {right} (at most 64, and 2**65536)")
        if operator == "*" and len(bits) == 2 and sum(bits) > 1 << 16:  # squaring in a loop
            raise _refuse("multiplies numbers beyond 2**65536")
        if operator == "*":
            n, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(n, int) and hasattr(seq, "__len__") and n * len(seq) > MAX_TEMPLATE_VALUE:
                raise _refuse(f"repeats a value {n} times (at most {MAX_TEMPLATE_VALUE} items)")
        if operator == "%" and isinstance(left, str):  # a `%` width or precision is an allocation
            specs = re.findall(r"%(?:\([^)]*\))?[#0 +-]*(\d*)(?:\.(\d*))?", left)
            _check_args(int(w) for spec in specs for w in spec if w)
            _check_args(right if isinstance(right, tuple) else [right])
        return super().call_binop(context, operator, left, right)


def _bounded_filter(f: Any) -> Any:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_args([*args, *kwargs.values()])
        return f(*args, **kwargs)

    return bounded


def _budgeted_range() -> Any:
    """A `range` for one render: its calls share MAX_TEMPLATE_RANGE items (nested loops multiply)."""
    left = [MAX_TEMPLATE_RANGE]

    def bounded_range(*args: int) -> range:
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise _refuse(f"loops over more than {MAX_TEMPLATE_RANGE} range() items in one render")
        return r

    return bounded_range


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does (sandboxed, trimmed blocks), with bounds."""
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["namespace"] = _BoundedNamespace
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"the model's chat template does not compile: {e}") from e
    except RecursionError:  # jinja's parser and code generator recurse once per nested expression
        raise ConfigError("the model's chat template does not compile: nested too deeply") from None


def _is_token_id(i: Any) -> bool:
    return not isinstance(i, bool) and hasattr(i, "__index__") and 0 <= int(i) < 1 << 32  # numpy ints too


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids and chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        eos_ids: Iterable[int] = (),
        bos_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        eos_ids = list(eos_ids)
        bad = [i for i in [*eos_ids, *([] if bos_id is None else [bos_id])] if not _is_token_id(i)]
        if bad:  # the tokenizers library takes u32 ids: a negative one would fail every request
            raise ConfigError(f"special token ids {bad} are not token ids (non-negative integers)")
        if chat_template is not None and not isinstance(chat_template, str):
            raise ConfigError(f"the chat template must be text, not {type(chat_template).__name__}")
        self.backend = backend
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None
        self._max_token_bytes: int | None = None

    @property
    def max_token_bytes(self) -> int:
        """The most text bytes one token stands for: a text of more than context x this many bytes
        cannot fit the context, whatever its tokens (checked before tokenising it)."""
        if self._max_token_bytes is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)  # byte-level tokens: one char per byte
            self._max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        return self._max_token_bytes

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole.

        BOS is prepended only when the model's metadata asks for it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's chat template (extra kwargs reach the template)."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template: use generate() with a plain prompt")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        context.update(kwargs)
        context["range"] = _budgeted_range()  # per render (kwargs cannot swap it for an unbounded one)
        try:
            out, size = [], 0
            for chunk in self._template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            ):
                size += len(chunk)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise _refuse(f"renders more than {MAX_TEMPLATE_OUTPUT} characters")
                out.append(chunk)
            return "".join(out)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from e
        except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
            # a template bug these messages trip (`1/0`, str + int): named, not a traceback from jinja
            raise InvalidRequestError(f"the chat template failed on these messages: {type(e).__name__}: "
                                      f"{str(e)[:200]}") from None

    def save(self, folder: str | Path) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` into a Hugging Face folder (what
        `load_tokenizer` and transformers read back: special ids, BOS rule and chat template included)."""
        import json

        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
               "bos_token": self.bos_token, "eos_token": self.eos_token, "model_max_length": 1 << 30}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


# --------------------------------------------------------------------------- builders


def _gguf_tokenizer(path: Path) -> Tokenizer:
    f = open_gguf(path)
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')"
        )
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    merges: list[str] = f.get("tokenizer.ggml.merges") or []
    types: list[int] = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ConfigError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def spell(token: str) -> str:  # a few files store raw text instead of the byte alphabet
        if set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ConfigError(f"{path}: malformed merge {merge!r} (expected 'left right')")
        pairs.append((left, right))
    try:
        backend = Backend(tok_models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception (a merge out of vocabulary)
        raise ConfigError(f"{path}: its tokens and merges are not a BPE vocabulary: {str(e)[:200]}") from None

    pre = f.get("tokenizer.ggml.pre")
    if pre == "smollm":  # llama.cpp: \p{N} split first, then GPT-2's regex
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in ("llama3", "llama-v3", "llama-bpe", "qwen2"):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_LIKE_PRE:
            logger.warning("%s: pre-tokenizer %r unknown, using GPT-2's split", path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == _USER_DEFINED and set(t) <= alphabet
    ]
    backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)

    eos = [f.get("tokenizer.ggml.eos_token_id"), f.get("tokenizer.ggml.eot_token_id")]
    bos = f.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        backend,
        eos_ids=[int(e) for e in eos if e is not None],
        bos_id=None if bos is None else int(bos),
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=f.get("tokenizer.chat_template"),
        vocab_size=len(tokens),
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _hf_chat_template(folder: Path, tok_cfg: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template


def _hf_tokenizer(folder: Path) -> Tokenizer | None:
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        return None
    try:
        backend = Backend.from_file(str(tok_file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise ConfigError(f"{tok_file} is not a tokenizer the tokenizers library can read: {str(e)[:200]}") from None
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    model_cfg = _read_json(folder / "config.json")
    gen_cfg = _read_json(folder / "generation_config.json")

    def token_id(name: str) -> int | None:
        text = _token_text(tok_cfg.get(name))
        return None if text is None else backend.token_to_id(text)

    eos_ids = _as_ids(model_cfg.get("eos_token_id")) + _as_ids(gen_cfg.get("eos_token_id"))
    eos_tok = token_id("eos_token")
    if eos_tok is not None:
        eos_ids.insert(0, eos_tok)
    bos = model_cfg.get("bos_token_id")
    bos = token_id("bos_token") if bos is None else int(bos)
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:  # did tokenizer.json's post-processor add it?
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    return Tokenizer(
        backend,
        eos_ids=eos_ids,
        bos_id=bos,
        add_bos=bool(add_bos),
        chat_template=_hf_chat_template(folder, tok_cfg),
    )


def load_tokenizer(source: str | Path) -> Tokenizer | None:
    """The model's tokenizer; None for a Hugging Face folder without ``tokenizer.json``."""
    path = resolve_source(source)
    try:
        if is_gguf(path):
            return _gguf_tokenizer(path)
        return _hf_tokenizer(path)
    except ConfigError as e:
        if str(path) in str(e):
            raise
        raise ConfigError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError,
            RecursionError) as e:
        # a missing or mistyped field (no token list, a list for an object, an id that is text), a file that
        # is not JSON or UTF-8: named, never a bare error from deep inside
        what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:200]}"
        raise ConfigError(f"{path}: not a readable tokenizer ({what})") from None
