"""Drafts from a small model with the target's tokenizer: its greedy continuation of each sequence.

Speculative decoding verifies whatever a drafter proposes (`models.speculative.verify` samples every
drafted position exactly as plain decoding would), so output never depends on the drafter; a good
one only lets more drafts through per pass. Prompt lookup (`propose_drafts`) costs nothing but
drafts only text that repeats; a draft model (SmolLM2-135M for its larger siblings, say) drafts any
text, for k small forward passes per verification pass.

The drafter keeps its own paged KV cache per sequence and remembers which tokens it holds: a call
feeds only what changed since the last one (the tokens the target accepted, and the correction),
rewinding past the drafts that were rejected. Pure torch, no Ray.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from models.batch import Batch
from models.cache import DEFAULT_BLOCK, KVCache
from models.config import ModelConfig
from models.errors import CacheFullError, ConfigError
from models.model import Transformer

log = logging.getLogger(__name__)

POOL_BYTES = 256 << 20  # the drafter's KV pool at most, unless a size is given


def check_draft(cfg: ModelConfig, draft: ModelConfig, name: str = "the draft model") -> None:
    """ConfigError unless `draft` can draft for `cfg`: the same vocabulary (a draft is a token id of both)."""
    if draft.vocab_size != cfg.vocab_size:
        raise ConfigError(f"draft_model {name}: its vocabulary has {draft.vocab_size} tokens but the model's has "
                          f"{cfg.vocab_size}: use a draft model with the same tokenizer")


class ModelDrafter:
    """Greedy drafts of a whole small model (`models.load_stage` of every layer), batched over sequences."""

    def __init__(self, model: Transformer, pool_tokens: int | None = None, max_sequences: int = 64) -> None:
        if not (model.is_first and model.is_last):
            raise ConfigError("a draft model must be a whole model (embedding to head), not a stage")
        self.model = model
        self.device = next(model.parameters()).device
        cfg, p = model.cfg, next(model.parameters())
        if pool_tokens is None:  # every sequence's whole context, within POOL_BYTES
            token_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * p.element_size()
            pool_tokens = max(cfg.max_seq_len, min(max_sequences * cfg.max_seq_len, POOL_BYTES // token_bytes))
        self.cache: KVCache = model.new_cache(pool_tokens, DEFAULT_BLOCK)
        self.held: dict[str, list[int]] = {}  # seq id -> the tokens whose keys/values the cache holds
        self.passes = 0  # forward passes run (a cost figure for stats and benches)
        self.crowded = False  # the last call left sequences without drafts for want of pool (warned once a spell)
        self.lock = threading.Lock()  # `propose` and `release` may come from different threads

    @torch.inference_mode()
    def propose(self, items: Sequence[tuple[str, Sequence[int], int]]) -> list[list[int]]:
        """(seq id, its tokens so far, k) per sequence -> up to k greedy drafts each ([] when k <= 0).

        A sequence whose cache cannot grow (the pool is full) gets no drafts this time: drafting is
        an optimisation, never a reason to fail a request."""
        with self.lock:
            return self._propose(items)

    def _propose(self, items: Sequence[tuple[str, Sequence[int], int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in items]
        ctx = self.model.cfg.max_seq_len  # past its own context the draft model has nothing to say
        live = [(i, sid, list(toks), k) for i, (sid, toks, k) in enumerate(items) if k > 0 and toks]
        live = [(i, sid, toks, min(k, ctx - len(toks))) for i, sid, toks, k in live if len(toks) < ctx]
        live = self._fitting(live)
        if not live:
            return out
        try:
            # first pass: each sequence's tokens past what the cache already holds (at least its last one)
            starts = [min(_common_prefix(self.held.get(sid, []), toks), len(toks) - 1) for _, sid, toks, _ in live]
            inputs = [toks[s:] for (_, _, toks, _), s in zip(live, starts)]
            nxt = self._forward([sid for _, sid, _, _ in live], starts, inputs)
            for (i, sid, toks, _), t in zip(live, nxt):
                self.held[sid] = toks
                out[i].append(t)
            # then one token at a time, for the sequences that want more drafts
            for j in range(1, max(k for *_, k in live)):
                more = [(i, sid) for i, sid, _, k in live if k > j]
                nxt = self._forward([sid for _, sid in more], [len(self.held[sid]) for _, sid in more],
                                    [[out[i][-1]] for i, _ in more])
                for (i, sid), t in zip(more, nxt):
                    self.held[sid].append(out[i][-1])
                    out[i].append(t)
        except CacheFullError:
            log.warning("the draft model's KV pool is full: %d sequences go without model drafts this pass",
                        len(live))
            self.cache.free(sid for _, sid, _, _ in live)
            for _, sid, _, _ in live:
                self.held.pop(sid, None)
            return [[] for _ in items]
        return out

    def _fitting(self, live: list[tuple[int, str, list[int], int]]) -> list[tuple[int, str, list[int], int]]:
        """The sequences whose drafts fit the pool this pass, those it already holds first; the others get
        none (evicting held ones for them would re-read every sequence's context every pass)."""
        bs, free, fit = self.cache.bs, self.cache.blocks.available, []
        for item in sorted(live, key=lambda it: it[1] not in self.held):  # stable: held ones first, in order
            _, sid, toks, k = item
            need = -(-(len(toks) + k - 1) // bs) - len(self.cache.table.get(sid, ()))  # last draft is not fed
            if need <= free:
                free -= max(need, 0)
                fit.append(item)
        if len(fit) < len(live) and not self.crowded:
            log.warning("the draft model's KV pool holds %d of %d sequences: the others go without model drafts "
                        "while it is full", len(fit), len(live))
        self.crowded = len(fit) < len(live)
        return sorted(fit)

    def _forward(self, seq_ids: list[str], starts: list[int], inputs: list[list[int]]) -> list[int]:
        """One batched pass; each sequence's argmax token after its last input."""
        b = Batch.build(seq_ids, starts, [len(x) for x in inputs]).to(self.device)
        x = torch.tensor([t for xs in inputs for t in xs], dtype=torch.long, device=self.device)  # (N,)
        logits = self.model(x, b, self.cache)  # (B, vocab)
        self.passes += 1
        return logits.argmax(-1).tolist()

    def release(self, seq_ids: Iterable[str]) -> None:
        """Frees the caches of sequences that ended (or left this drafter)."""
        ids = list(seq_ids)
        with self.lock:
            self.cache.free(ids)
            for sid in ids:
                self.held.pop(sid, None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case: the sequence went on from what the cache holds
        return n
    return int(np.argmax(np.asarray(a[:n]) != np.asarray(b[:n])))
