"""Sampling the next token on the last stage: greedy, temperature, top-k, top-p, seeds, logprobs.

Randomness is *stateless*: the generator for a token is seeded from (request seed, position), so
a step re-run on another replica after a failure draws exactly the same token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models.errors import InvalidRequestError

MAX_SPECULATIVE = 16  # draft tokens per verification pass, at most
FAILED = -1  # the token of a row whose logits were NaN or infinite (`SequenceState.add` ends its sequence)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16  # generated tokens at most (EOS excluded)
    temperature: float = 0.0  # 0 = greedy (the default); > 0 samples from softmax(logits / T)
    top_k: int | None = None  # keep only the k most likely tokens (None = all)
    top_p: float | None = None  # keep the smallest set whose probability reaches p (None = all)
    seed: int | None = None  # the router fills one in when None, so every request is replayable
    stop: tuple[str, ...] = ()  # strings that end the generation (not included in the text)
    logprobs: int | None = None  # None = none; 0 = the chosen token's; k = plus the top k
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    speculative: int = 0  # draft tokens verified per pass (prompt lookup); 0 = off. Output is unchanged

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            problems.append(f"temperature={self.temperature!r} must be a finite number >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            problems.append(f"top_k={self.top_k!r} must be a positive integer or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            problems.append(f"logprobs={self.logprobs!r} must be an integer in [0, 20] or None")
        if (not isinstance(self.speculative, int) or isinstance(self.speculative, bool)
                or not 0 <= self.speculative <= MAX_SPECULATIVE):
            problems.append(f"speculative={self.speculative!r} must be an integer in [0, {MAX_SPECULATIVE}] "
                            "(draft tokens per pass; 0 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            problems.append(f"seed={self.seed!r} must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop={self.stop!r} must be non-empty strings")
        if problems:
            raise InvalidRequestError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability of the chosen token under the model (temperature 1)
    top: dict[int, float] = field(default_factory=dict)  # the top-k alternatives asked for


def _generator(seed: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63 - 1))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           positions: Sequence[int]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: (B, vocab) float32 on any device. positions: where each new token will sit (seeds the draw).

    Greedy rows take their argmax where the logits are (a GPU's logits never cross to the host whole);
    the rows that draw or want logprobs are copied to the CPU, whose seeded generator makes each draw
    the same on every device. A row with a NaN or +inf logit gets `FAILED` (one sequence's overflow
    must not fail the others sampled with it).
    """
    top, index = logits.max(-1)  # the argmax (the first of equals); its value is NaN or inf in a broken row
    tokens = [t if math.isfinite(v) else FAILED for t, v in zip(index.tolist(), top.tolist())]  # greedy for all
    host = [i for i, p in enumerate(params) if (not p.greedy or p.logprobs is not None) and tokens[i] != FAILED]
    if not host:
        return tokens, [None] * len(params)
    rows = dict(zip(host, logits[host].cpu()))  # (len(host), vocab)
    logp = {i: torch.log_softmax(rows[i], -1) for i in host if params[i].logprobs is not None}
    out_lp: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        if tokens[i] == FAILED:
            out_lp.append(None)
            continue
        if not p.greedy:
            row = rows[i] / p.temperature
            if p.top_k is not None and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, -1)
            if not bool(torch.isfinite(probs).all()):  # a temperature so small that logits / T overflowed:
                z = (rows[i].double() - rows[i].max()) / p.temperature  # the same softmax, shifted: 0 at the top
                if p.top_k is not None and p.top_k < z.numel():
                    z = z.masked_fill(z < torch.topk(z, p.top_k).values[-1], float("-inf"))
                probs = torch.softmax(z, -1)
            if p.top_p is not None and p.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p >= p.top_p  # keep up to the first that reaches p
                probs = probs.scatter(0, order[drop], 0.0)
            seed = p.seed if p.seed is not None else 0
            tokens[i] = int(torch.multinomial(probs, 1, generator=_generator(seed, positions[i])))
        if p.logprobs is None:
            out_lp.append(None)
            continue
        top = {}
        if p.logprobs > 0:
            vals, idx = torch.topk(logp[i], p.logprobs)
            top = dict(zip(idx.tolist(), vals.tolist()))
        out_lp.append(TokenLogprob(tokens[i], float(logp[i][tokens[i]]), top))
    return tokens, out_lp
