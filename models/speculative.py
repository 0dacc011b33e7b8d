"""Lossless speculative decoding with prompt-lookup drafts (no second model). Pure torch, no Ray.

A pass feeds each sequence's uncached tokens plus up to k *draft* tokens (copied from where the
sequence's last n-gram occurred before), reads the logits at the last input token and at every
draft, and samples each of those positions exactly as plain decoding would (same seeded draw per
position, `models.sampling.sample`). Drafts are kept while the sampled token equals them; the first
sampled token that differs is emitted as well, then the pass ends. Each emitted token is therefore
the one plain decoding produces at that position: greedy and seeded output are token-for-token the
same, only in fewer passes. Rejected positions are rewound from the KV cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.batch import Batch
from models.sampling import SamplingParams, TokenLogprob, sample

if TYPE_CHECKING:
    from models.cache import KVCache
    from models.drafter import ModelDrafter
    from models.generation import Prompt, SequenceState
    from models.model import Transformer
    from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_NGRAM = 3  # longest suffix the drafter looks up


def propose_drafts(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM,
                   min_ngram: int = 1) -> list[int]:
    """k tokens that followed the most recent earlier occurrence of the sequence's last n-gram.

    Tries n = max_ngram down to min_ngram; [] when nothing matches (or k <= 0). A copy that reaches
    the sequence's end continues with its own first tokens: [a b a b] drafts [a b a b ...].
    """
    L = len(tokens)
    if k <= 0 or L < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)  # (L,)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        # windows starting at 0..L-n-1: each is followed by at least one token, none is the suffix itself
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # (L-n, n)
        hits = np.flatnonzero((windows == arr[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            out = arr[start:start + k].tolist()
            while len(out) < k:  # the copy ran into the end: it goes on copying itself (periodic text)
                out.append(out[len(out) - (L - start)])
            return out
    return []


def accepted_prefix(sampled: Sequence[int], drafts: Sequence[int]) -> int:
    """How many drafts the sampled tokens confirm: the length of their common prefix.

    sampled: (len(drafts) + 1,) the token drawn after the last input token and after each draft.
    The pass emits sampled[:accepted + 1]: the confirmed drafts, then the correction (or bonus) token.
    """
    n = 0
    for s, d in zip(sampled, drafts):
        if s != d:
            break
        n += 1
    return n


def draft_budget(state: SequenceState) -> int:
    """Drafts worth sending for a sequence: k, less what max_new_tokens or the context leave room for."""
    return draft_budget_of(state.params, len(state.generated), len(state.prompt) + len(state.generated),
                           state.max_seq_len)


def draft_budget_of(params: SamplingParams, generated: int, held: int, max_seq_len: int) -> int:
    """`draft_budget` from the counts: `generated` tokens so far, `held` = prompt + generated."""
    room_new = params.max_new_tokens - generated - 1  # a pass emits drafts + 1
    room_ctx = max_seq_len - 1 - held  # the last context position is never an input
    return max(0, min(params.speculative, room_new, room_ctx))


PROBE_AFTER = 8  # passes a sequence goes without drafts (its budget fell to 0) before one draft is tried


def adapt_budget(k: int, k_max: int, drafted: int, accepted: int) -> int:
    """The next pass's draft budget for a sequence: doubled (up to `k_max`) when every draft was
    accepted, halved when none was (0 pauses drafting: a rejected draft still costs a position in
    every stage's pass), kept otherwise. Output never depends on it."""
    if drafted == 0:
        return k
    if accepted >= drafted:
        return min(k_max, max(1, 2 * k))
    return k // 2 if accepted == 0 else k


def tail_index(lengths: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
    """(sum(counts),) packed indices of the last counts[b] of each sequence's lengths[b] new tokens."""
    out, end = [], 0
    for n, c in zip(lengths, counts):
        end += n
        out.extend(range(end - c, end))
    return torch.tensor(out, dtype=torch.long)


@dataclass
class PassResult:
    """What one verification pass did for one sequence."""

    drafted: int  # drafts sent
    accepted: int  # drafts the model confirmed (some may fall after a stop and not be emitted)
    emitted: int  # tokens handed to SequenceState.add (stops included)


def verify(logits: torch.Tensor, states: Sequence[SequenceState], drafts: Sequence[Sequence[int]],
           inputs: Sequence[Sequence[int]]) -> list[tuple[list[int], list[TokenLogprob | None], int]]:
    """Samples every verified position and finds each sequence's accepted drafts.

    logits: (sum(len(d) + 1), vocab) rows of the last input token and each draft, sequence by sequence.
    Returns per sequence (tokens to emit, their logprobs, drafts accepted).
    """
    params, positions = [], []
    for s, d, x in zip(states, drafts, inputs):
        first = s.cached + len(x) - len(d)  # where the token after the last uncached input sits
        params += [s.params] * (len(d) + 1)
        positions += range(first, first + len(d) + 1)
    tokens, lps = sample(logits, params, positions)
    out, row = [], 0
    for d in drafts:
        sampled, lp = tokens[row:row + len(d) + 1], lps[row:row + len(d) + 1]
        row += len(d) + 1
        n = accepted_prefix(sampled, d)
        out.append((sampled[:n + 1], lp[:n + 1], n))
    return out


def speculative_step(model: Transformer, cache: KVCache, active: Sequence[SequenceState],
                     tokenizer: Tokenizer | None, device: torch.device,
                     drafter: ModelDrafter | None = None) -> list[PassResult]:
    """One verification pass for every active sequence (prefills included): drafts (prompt lookup, or
    `drafter`'s), forward, accept, emit through SequenceState.add (stop rules per token), rewind the
    cache to the kept positions."""
    if drafter is None:
        drafts = [propose_drafts(s.prompt + s.generated, draft_budget(s)) for s in active]
    else:
        drafts = drafter.propose([(s.seq_id, s.prompt + s.generated, draft_budget(s)) for s in active])
    inputs = [s.next_input() + d for s, d in zip(active, drafts)]
    lengths = [len(x) for x in inputs]
    batch = Batch.build([s.seq_id for s in active], [s.cached for s in active], lengths)
    x = torch.tensor([t for xs in inputs for t in xs], dtype=torch.long, device=device)  # (N,)
    at = tail_index(lengths, [len(d) + 1 for d in drafts]).to(device)  # (M,)
    logits = model(x, batch.to(device), cache, logits_at=at)  # (M, vocab)
    results = []
    for s, d, (tokens, lps, n_acc) in zip(active, drafts, verify(logits, active, drafts, inputs)):
        emitted = s.add_pass(tokens, lps, tokenizer, len(d), n_acc)
        if not s.done:
            cache.rewind(s.seq_id, s.cached)  # keep the accepted positions only
        results.append(PassResult(len(d), n_acc, emitted))
    return results


def _timed_run(model: Transformer, prompts: list[Prompt], max_new_tokens: int,
               sampling: dict[str, Any]) -> dict[str, Any]:
    from models.generation import generate_local

    t0 = time.perf_counter()
    outs = generate_local(model, prompts, max_new_tokens, **sampling)
    seconds = time.perf_counter() - t0
    tokens = sum(o.usage["completion_tokens"] for o in outs)
    spec = [o.speculation for o in outs if o.speculation is not None]
    passes = sum(s["passes"] for s in spec) if spec else tokens
    return {
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "passes": passes,  # per-sequence verification passes (plain decoding: one per token)
        "drafted": sum(s["drafted"] for s in spec),
        "accepted": sum(s["accepted"] for s in spec),
        "accepted_per_pass": round(sum(s["accepted"] for s in spec) / passes, 3) if passes else 0.0,
        "tokens_per_pass": round(tokens / passes, 3) if passes else 0.0,
        "token_ids": [o.token_ids for o in outs],
    }


def benchmark_speculative(model: Transformer, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64,
                          k: int = 4, repeats: int = 1, **sampling: Any) -> dict[str, Any]:
    """Tokens/s and tokens per pass of `generate_local` without and with speculation (k drafts), JSON-able.

    Each mode runs `repeats` times after one warm-up; the fastest run is reported. "identical" says
    whether both modes produced the same tokens.
    """
    from models.generation import is_batch

    plist = list(prompts) if is_batch(prompts) else [prompts]
    sampling = {"ignore_eos": True, "seed": 0, **sampling}
    report: dict[str, Any] = {"k": k, "max_new_tokens": max_new_tokens, "prompts": len(plist)}
    for name, spec in (("plain", 0), ("speculative", k)):
        args = {**sampling, "speculative": spec}
        _timed_run(model, plist[:1], 2, args)  # warm-up
        runs = [_timed_run(model, plist, max_new_tokens, args) for _ in range(max(1, repeats))]
        report[name] = min(runs, key=lambda r: r["seconds"])
    report["identical"] = report["plain"].pop("token_ids") == report["speculative"].pop("token_ids")
    plain, spec_run = report["plain"]["tokens_per_s"], report["speculative"]["tokens_per_s"]
    report["speedup"] = round(spec_run / plain, 3) if plain and spec_run else None
    log.info("speculative bench: %s", report)
    return report
