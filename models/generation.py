"""What a generation is, independent of where it runs: prompt checks, per-sequence state, stop
rules, the finished `Completion`; and the single-process reference `generate_local`.

The router (actors/) and `Transformer.generate` share all of this, so "identical" compares
the network alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from models.batch import Batch, long_tensor
from models.cache import DEFAULT_BLOCK
from models.config import ModelConfig
from models.errors import InvalidRequestError, NonFiniteLogitsError, PromptTooLongError
from models.sampling import SamplingParams, TokenLogprob, sample
from models.speculative import speculative_step

if TYPE_CHECKING:
    from models.cache import KVCache
    from models.drafter import ModelDrafter, check_draft
    from models.model import Transformer
    from models.tokenizer import Tokenizer

Prompt = str | list[int]


@dataclass
class Completion:
    """One finished generation, as the public API returns it."""

    text: str  # decoded generated text (stop string and EOS excluded)
    token_ids: list[int]  # generated tokens only, EOS excluded
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    prompt_token_ids: list[int] = field(default_factory=list)
    route: list[str] = field(default_factory=list)  # the stage actors that served it (pipelines only)
    speculation: dict[str, int] | None = None  # passes, drafted, accepted (speculative decoding only)


def is_batch(prompts: Any) -> bool:
    """A list of prompts (strs or id lists), as opposed to one prompt (a str, or a list of ids)."""
    return isinstance(prompts, (list, tuple)) and any(isinstance(p, (str, list, tuple)) for p in prompts)


def encode_prompt(prompt: Prompt, cfg: ModelConfig, tokenizer: Tokenizer | None) -> list[int]:
    """Checks a prompt and returns its token ids; raises InvalidRequestError naming the problem."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty: give at least one character or token id")
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass the prompt as a list of token ids")
        try:
            nbytes = len(prompt.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidRequestError("the prompt is not valid Unicode text (a lone surrogate?): send UTF-8 text") \
                from None
        widest = getattr(tokenizer, "max_token_bytes", None)  # the most bytes a token stands for
        if widest and nbytes > cfg.max_seq_len * widest:  # too long whatever its tokens: not tokenised
            raise PromptTooLongError(f"prompt has {nbytes} bytes, more than a {cfg.max_seq_len}-token context can "
                                     f"hold (a token is at most {widest} bytes): shorten it")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        bad = [x for x in prompt if not isinstance(x, int) or isinstance(x, bool)]
        if bad:
            raise InvalidRequestError(f"token ids must be integers; got {bad[0]!r} ({type(bad[0]).__name__})")
        ids = list(prompt)
        out = [x for x in ids if not 0 <= x < cfg.vocab_size]
        if out:
            raise InvalidRequestError(f"token id {out[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    else:
        raise InvalidRequestError(f"a prompt is a str or a list of token ids, not {type(prompt).__name__}")
    if not ids:
        raise InvalidRequestError("prompt is empty: give at least one character or token id")
    if len(ids) >= cfg.max_seq_len:
        raise PromptTooLongError(
            f"prompt has {len(ids)} tokens but the context is {cfg.max_seq_len}: "
            f"shorten it to at most {cfg.max_seq_len - 1} tokens"
        )
    return ids


def stream_safe(text: str, stop: Sequence[str] = ()) -> str:
    """The part of a generation's text so far that a stream can show now and never take back.

    Holds back a trailing "\ufffd" (a multi-byte character whose last bytes are still to come) and
    a tail that may be the start of a stop string (the stop string itself is never shown).
    """
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    head = text[:end]
    hold = max((k for s in stop for k in range(min(len(s) - 1, end), 0, -1) if head.endswith(s[:k])), default=0)
    return head[:end - hold]


@dataclass
class SequenceState:
    """One sequence while it generates: what it has produced and whether it is done."""

    seq_id: str
    prompt: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    max_seq_len: int
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached: int = 0  # tokens whose keys/values the stages hold
    text_end: int | None = None  # where a stop string cut the text
    spec_passes: int = 0  # speculative verification passes
    spec_drafted: int = 0  # draft tokens sent
    spec_accepted: int = 0  # draft tokens confirmed and emitted

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_input(self) -> list[int]:
        """Tokens to send this step: the prompt first, then the last generated token."""
        return (self.prompt + self.generated)[self.cached:]

    def add(self, token: int, logprob: TokenLogprob | None, tokenizer: Tokenizer | None) -> None:
        if token < 0:  # `models.sampling.FAILED`: nothing can be drawn from this sequence's logits
            raise NonFiniteLogitsError(
                f"sequence {self.seq_id}: the model's logits after {len(self.prompt) + len(self.generated)} tokens "
                "were NaN or infinite (its weights or activations overflowed their dtype, float16 soonest: "
                "try bfloat16 or float32)")
        self.cached = len(self.prompt) + len(self.generated)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.params.stop and tokenizer is not None:
            text = tokenizer.decode(self.generated)
            hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
            if hits:
                self.text_end = min(hits)
                self.finish_reason = "stop"
                return
        if len(self.generated) >= self.params.max_new_tokens or self.cached + 1 >= self.max_seq_len:
            self.finish_reason = "length"

    def add_pass(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprob | None], tokenizer: Tokenizer | None,
                 drafted: int | None = None, accepted: int = 0) -> int:
        """A pass's tokens, added until the sequence ends; returns how many it took. A verification pass
        (`drafted` drafts sent, its first `accepted` tokens confirming them) is counted: the drafts accepted
        are those among the tokens taken (not past a stop)."""
        taken = 0
        for token, lp in zip(tokens, logprobs):
            self.add(token, lp, tokenizer)
            taken += 1
            if self.done:
                break
        if drafted is not None:
            self.spec_passes, self.spec_drafted = self.spec_passes + 1, self.spec_drafted + drafted
            self.spec_accepted += min(accepted, taken)
        return taken

    def speculation(self) -> dict[str, int] | None:
        """Verification passes, drafts sent and drafts emitted (speculative decoding only)."""
        if not self.params.speculative:
            return None
        return {"passes": self.spec_passes, "drafted": self.spec_drafted, "accepted": self.spec_accepted}

    def completion(self, tokenizer: Tokenizer | None) -> Completion:
        text = tokenizer.decode(self.generated) if tokenizer is not None else ""
        if self.text_end is not None:
            text = text[: self.text_end]
        n_prompt, n_gen = len(self.prompt), len(self.generated)
        return Completion(
            text=text,
            token_ids=list(self.generated),
            finish_reason=self.finish_reason or "length",
            usage={"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen},
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            prompt_token_ids=list(self.prompt),
            speculation=self.speculation(),
        )


_ids = itertools.count()


@torch.inference_mode()
def generate_local(model: Transformer, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 16,
                   draft_model: Transformer | ModelDrafter | None = None, **sampling: Any) -> list[Completion]:
    """The single-process reference: every prompt in one continuous batch on one whole-model module.

    Takes `Pipeline.generate`'s keywords (`SamplingParams`' fields: temperature, top_k, top_p, seed,
    stop, logprobs, ignore_eos, speculative); str prompts need `model.tokenizer` (`models.load_model`
    sets it). `speculative=k` verifies up to k drafts per pass (`models.speculative`): the same tokens
    in fewer passes. Drafts come from prompt lookup, or from `draft_model` (a small model with the
    same tokenizer, `models.drafter`) when given.
    """
    from models.drafter import ModelDrafter, check_draft

    drafter = draft_model if draft_model is None or isinstance(draft_model, ModelDrafter) else ModelDrafter(draft_model)
    if drafter is not None:
        check_draft(model.cfg, drafter.model.cfg)
    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    tokenizer = getattr(model, "tokenizer", None)
    plist = list(prompts) if is_batch(prompts) else [prompts]
    cfg = model.cfg
    states = []
    for p in plist:
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, ()))
        sp = SamplingParams(**{**vars(params), "seed": seed})
        states.append(SequenceState(f"local-{next(_ids)}", encode_prompt(p, cfg, tokenizer), sp,
                                    frozenset(cfg.eos_ids), cfg.max_seq_len))
    # a pool just big enough: every sequence's whole length (plus drafts), in whole blocks, plus one block
    # for the padded rows of decode graphs (`Transformer.cuda_graphs`)
    need = [min(len(s.prompt) + s.params.max_new_tokens, cfg.max_seq_len) + s.params.speculative + 1 for s in states]
    tokens = sum(-(-n // DEFAULT_BLOCK) * DEFAULT_BLOCK for n in need) + DEFAULT_BLOCK
    # with decode graphs, the last call's pool when it fits (the graphs were captured against it)
    cache = model.graphs.spare_cache(tokens) if model.graphs is not None else None
    cache = model.new_cache(tokens) if cache is None else cache  # (an empty cache is falsy: it has a len)
    device = next(model.parameters()).device
    active = list(states)
    while active:
        if params.speculative:
            speculative_step(model, cache, active, tokenizer, device, drafter)
        else:
            plain_step(model, cache, active, tokenizer, device)
        cache.free(s.seq_id for s in active if s.done)
        if drafter is not None:
            drafter.release(s.seq_id for s in active if s.done)
        active = [s for s in active if not s.done]
    return [s.completion(tokenizer) for s in states]


def plain_step(model: Transformer, cache: KVCache, active: Sequence[SequenceState],
               tokenizer: Tokenizer | None, device: torch.device) -> None:
    """One decoding step for every active sequence (prefills included): one new token each."""
    inputs = [s.next_input() for s in active]
    batch = Batch.build([s.seq_id for s in active], [s.cached for s in active], [len(x) for x in inputs])
    x = long_tensor([t for xs in inputs for t in xs]).to(device)  # (N,)
    logits = model(x, batch, cache)  # (B, vocab)
    positions = [s.cached + len(x) for s, x in zip(active, inputs)]
    tokens, lps = sample(logits, [s.params for s in active], positions)
    for s, t, lp in zip(active, tokens, lps):
        s.add(t, lp, tokenizer)


def plan_chunks(pending: Sequence[int], budget: int) -> list[int]:
    """Chunked prefill: how many of its `pending` input tokens each sequence sends this step. A decode
    (one token) always goes; prompts share `budget` tokens in order, so a long prompt takes several
    steps and running decodes keep their pace; 0: the sequence waits for the next step."""
    out, left = [], budget
    for n in pending:
        take = n if n <= 1 else min(n, left)
        left -= take if n > 1 else 0
        out.append(take)
    return out
