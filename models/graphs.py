"""Decode steps as CUDA graphs: one launch for a model's (or stage's) whole decode step.

Eager decoding on a GPU is bound by kernel launches: a layer's decode step is ~17 small kernels, each
costing the host more than the GPU takes to run it. A decode step (every sequence brings one token) has
shapes that depend only on its batch size and its longest block table, so `DecodeGraphs` rounds both up
to a bucket (powers of two), pads the step to it, and captures the model's step once per bucket with
`torch.cuda.CUDAGraph` (as vLLM and gpt-fast do); later steps of that bucket copy their inputs into the
graph's static buffers (one small copy for the ints, one for the input) and replay it.

Padded rows write their keys and values into a block of their own (`KVCache.scratch_block`) and read only
it; padded key columns are masked, so no sequence sees them. Prefills, mixed steps and speculative
verification stay eager. Graphs hold the addresses of the weights and the cache: weights replaced or moved
(`Transformer.load_weights`, `.to()`, LoRA) or another cache drop them, and they are captured again.

On a CPU (`capture` off) the same padded, static-shape step runs eagerly: tests check the bucketing,
padding and masking without a GPU; `Transformer.cuda_graphs(None)` uses graphs on CUDA devices only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from models.batch import Batch, long_tensor
from models.errors import CacheFullError

if TYPE_CHECKING:
    from models.cache import KVCache
    from models.model import Transformer

log = logging.getLogger(__name__)

MAX_BATCH = 256  # larger decode steps stay eager
MAX_GRAPHS = 96  # buckets captured per cache at most; steps of further buckets run padded but uncaptured


def bucket(n: int, cap: int) -> int:
    """`n` rounded up to a power of two, at most `cap` (and never below `n`)."""
    return max(n, min(1 << (n - 1).bit_length(), cap))


@dataclass
class Bucket:
    """One bucket's static buffers and its graph (None: not captured, the step runs eagerly on the buffers)."""

    ints: torch.Tensor  # (2B + B*W,) long: starts | slots | block table, the step's ints laid out for one copy
    x: torch.Tensor  # (B,) token ids (first stage) or (B, dim) hidden states
    batch: Batch  # views of `ints`: what the layers read
    cols: torch.Tensor  # (W * block_size,) key positions, for the mask
    out: torch.Tensor | None = None  # the step's output, (B, dim) or (B, vocab): graph memory when captured
    graph: Any = None  # torch.cuda.CUDAGraph


class DecodeGraphs:
    """A model's decode steps, padded to buckets of (batch, blocks) and replayed as CUDA graphs."""

    def __init__(self, enabled: bool | None = None, max_batch: int = MAX_BATCH, max_graphs: int = MAX_GRAPHS) -> None:
        self.enabled = enabled  # True: any device (CPU: padded, uncaptured), None: CUDA devices only
        self.max_batch, self.max_graphs = max_batch, max_graphs
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.cache: KVCache | None = None  # the cache the buckets were captured against
        self.ptrs: tuple[int, ...] = ()  # the weights' addresses then
        self.params: list[torch.Tensor] = []
        self.pool: Any = None  # the graphs' shared memory pool (they never run at once)
        self.failed: str | None = None  # why capturing stopped (the steps run eagerly since)
        self.counts = {"replays": 0, "uncaptured": 0, "captures": 0, "capture_ms": 0.0}

    def clear(self) -> None:
        """Drops every graph (weights or cache changed); the next decode steps capture again."""
        self.buckets.clear()
        self.cache, self.ptrs, self.params = None, (), []

    def spare_cache(self, num_tokens: int) -> KVCache | None:
        """The cache the graphs were captured against, when it holds no sequence and at least `num_tokens`
        (`generate_local` reuses it instead of capturing again for a new pool), else None."""
        c = self.cache
        return c if c is not None and not len(c) and not c.prefix_caching and c.num_tokens >= num_tokens else None

    def stats(self) -> dict[str, Any]:
        return {"graphs": sum(b.graph is not None for b in self.buckets.values()), **self.counts,
                "capture_ms": round(self.counts["capture_ms"], 1), "failed": self.failed}

    def run(self, model: Transformer, x: torch.Tensor, b: Batch, cache: KVCache) -> torch.Tensor | None:
        """The step's output as `Transformer.forward` returns it, or None when the step is not for a graph
        (not a pure decode step, too large, graphs off for this device or a capture failed before): then the
        caller runs it eagerly."""
        capture = torch.device(cache.device).type == "cuda"
        if self.enabled is False or self.enabled is None and not capture or self.failed and capture:
            return None
        starts, lengths, _ = b.host_lists()
        B = len(lengths)
        if not B or B > self.max_batch or max(lengths) != 1:
            return None
        if cache is not self.cache or self._weights_moved(model):
            self.clear()
            self.cache, self.params = cache, list(model.parameters())
            self.ptrs = tuple(p.data_ptr() for p in self.params)
        try:
            scratch = cache.scratch_block()
        except CacheFullError:  # not even one block to pad with: this step runs eagerly
            return None
        tables = cache.plan(b)  # from here on the step must run: its blocks are taken
        bs, W = cache.bs, max(len(t) for t in tables)
        key = (bucket(B, self.max_batch), bucket(W, -(-model.cfg.max_seq_len // bs)))
        g = self.buckets.get(key)
        new = g is None
        if new:
            g = self.buckets[key] = self._bucket(model, cache, *key)
        Bb, Wb = key
        pad = Bb - B
        ints = (starts + [0] * pad  # positions (a decode step's token sits at its sequence's start)
                + [t[s // bs] * bs + s % bs for t, s in zip(tables, starts)] + [scratch * bs] * pad  # slots
                + [i for t in tables for i in t + [scratch] * (Wb - len(t))] + [scratch] * (Wb * pad))  # tables
        g.ints.copy_(long_tensor(ints))
        g.x[:B].copy_(x)
        if new and capture and self.stats()["graphs"] < self.max_graphs:
            self._capture(model, cache, g)
            self.ptrs = tuple(p.data_ptr() for p in self.params)  # first-use fusing may have moved them
        if g.graph is not None:
            g.graph.replay()
            self.counts["replays"] += 1
        else:
            g.out = self._step(model, cache, g)
            self.counts["uncaptured"] += 1
        return g.out[:B].clone()  # the graph's memory is rewritten by its next replay

    def _weights_moved(self, model: Transformer) -> bool:
        return any(p.data_ptr() != q for p, q in zip(self.params, self.ptrs))

    @staticmethod
    def _bucket(model: Transformer, cache: KVCache, B: int, W: int) -> Bucket:
        dev = cache.device
        ints = torch.zeros(2 * B + B * W, dtype=torch.long, device=dev)
        first = model.tok_embeddings is not None
        x = (torch.zeros(B, dtype=torch.long, device=dev) if first
             else torch.zeros(B, model.cfg.dim, dtype=next(model.parameters()).dtype, device=dev))
        rows = torch.arange(B, device=dev)
        starts = ints[:B]
        batch = Batch(seq_ids=[""] * B, starts=starts, lengths=torch.ones_like(rows), token_seq=rows,
                      token_t=torch.zeros_like(rows), positions=starts, last_token=rows,
                      block_table=ints[2 * B:].view(B, W), token_slot=ints[B:2 * B], dims=(B, 1, W * cache.bs))
        return Bucket(ints=ints, x=x, batch=batch, cols=torch.arange(W * cache.bs, device=dev))

    @staticmethod
    def _step(model: Transformer, cache: KVCache, g: Bucket) -> torch.Tensor:
        """The padded step on the static buffers (captured, or run as it is)."""
        b = g.batch
        mask = (g.cols[None, :] <= b.starts[:, None])[:, None, None]  # (B, 1, 1, W * block_size)
        return model.step(g.x, b, cache, mask, b.last_token)

    def _capture(self, model: Transformer, cache: KVCache, g: Bucket) -> None:
        """One eager run first (first-use work, such as fusing weights or library handles, must not be
        captured; it writes the same keys and values the replay then writes again), then the capture."""
        t0 = time.perf_counter()
        try:
            self._step(model, cache, g)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's unsafe calls fail the capture (a stage's other threads go on)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                g.out = self._step(model, cache, g)
            g.graph = graph
            self.counts["captures"] += 1
        except Exception as e:  # noqa: BLE001 - a capture that fails leaves the eager path, which still works
            self.failed = f"{type(e).__name__}: {e}"[:300]
            g.graph = g.out = None
            log.warning("CUDA graph capture failed, decode steps run eagerly from now on: %s", self.failed)
        self.counts["capture_ms"] += (time.perf_counter() - t0) * 1e3
