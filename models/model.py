"""A Llama-family decoder in plain PyTorch, read top to bottom.

A *stage* is this same module with the pieces it does not own left out (torchtitan): only the
first stage has `tok_embeddings`, only the last has `norm` and `output`, and each holds just its
own slice of `layers` (an `nn.ModuleDict` keyed by the global layer index).

Tokens travel *packed*: a step of B sequences that each bring n_b new tokens is one (N, dim)
tensor with N = sum(n_b), so prefills of different lengths and one-token decodes share a step
without padding the projections and MLPs (continuous batching). Only attention pads, per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from models import rope
from models.batch import Batch
from models.cache import DEFAULT_BLOCK, KVCache
from models.config import ModelConfig
from models.errors import ConfigError
from models.generation import Completion, Prompt, generate_local
from models.graphs import DecodeGraphs

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in at least float32 (as HF Llama does), then scale in the model's dtype; one fused
        # op in float32/64 (the same bits as the op-by-op form), and HF's rounding before the scale below
        if x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, (max_seq_len, head_dim), in float64 so every dtype rounds them once.

    HF's rotate_half layout; the sin table's first half is negated, so that `apply_rope` rotates with
    one roll instead of two slices, a negation and a concatenation (the same bits: -a*b == a*-b)."""
    hd = cfg.head_dim
    cpu = torch.device("cpu")  # real tensors even when the module is built on the meta device
    with torch.device(cpu):
        freqs = rope.inv_freq(cfg.rope_theta, hd, cfg.rope_scaling)  # (hd/2,) scaled past the trained context
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), freqs)
    emb = torch.cat([angles, angles], dim=-1)  # (L, hd)
    scale = rope.attention_factor(cfg.rope_scaling)  # YaRN's mscale; 1 otherwise
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    sin[:, :hd // 2].neg_()
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, heads, hd); cos/sin: (N, 1, hd), sin signed (`rope_tables`); roll(x) = [x2, x1], and
    # [x2, x1] * [-sin1, sin2] = rotate_half(x) * sin
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in place (the same ops in the same order: the same bits), for inference."""
    rolled = x.roll(x.shape[-1] // 2, -1).mul_(sin)
    return x.mul_(cos).add_(rolled)


class FusedLinears:
    """Several linears that read the same input, as one matmul whose output is their outputs side by side
    (gpt-fast's wqkv): fewer, larger kernels a layer. The linears stay the modules (state dicts, LoRA and
    training see them unchanged); at the first inference call their weights (and biases, when all have
    one: `bias`) become row views of one tensor, so nothing is held twice. Weights replaced or moved since
    (`load_weights`, `.to()`) are fused again; `None` when any linear is not a plain `nn.Linear` (LoRA
    wraps them) or only some have a bias.

    By default only on accelerators, where a decode step is bound by kernel launches; CPU weights stay as
    loaded (stages share them zero-copy with the object store, and the matmuls are bound by memory
    bandwidth: SmolLM2 gained nothing measurable, README). `Transformer.fuse_linears(True)` fuses on CPUs too."""

    def __init__(self, *names: str) -> None:
        self.names = names  # the linears' attribute names in their module, in output order
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None  # their biases side by side (None: they have none)
        self.ptrs: tuple[int, ...] = ()  # where the linears' weights (and biases) started when `weight` was built
        self.enabled: bool | None = None  # None: on accelerators only
        self.declined = 0  # the first weight's address when fusing was declined for its device (CPU)

    def get(self, owner: nn.Module) -> torch.Tensor | None:
        """The fused weight of `owner`'s linears (its current ones), or None. Cheap when it has nothing to do
        (it runs twice a layer and step): plain dict reads, no module attribute lookups."""
        if self.enabled is False:
            return None
        mods = [owner._modules[n] for n in self.names]
        if self.declined and type(mods[0]) is nn.Linear and mods[0]._parameters["weight"].data_ptr() == self.declined:
            return None  # declined before: a CPU weight
        ws = [m._parameters.get("weight") if type(m) is nn.Linear else None for m in mods]
        bs = [m._parameters.get("bias") for m in mods]
        if any(w is None for w in ws) or len({b is None for b in bs}) > 1:  # LoRA wraps one, or some biases
            return None
        ptrs = tuple(t.data_ptr() for t in ws + bs if t is not None)
        if ptrs == self.ptrs and self.weight is not None:
            return self.weight
        if ws[0].is_meta:
            return None
        if self.enabled is None and ws[0].device.type == "cpu":
            self.declined = ptrs[0]
            return None
        self.weight = _fuse_rows(ws)  # (sum of out_features, in_features)
        self.bias = None if bs[0] is None else _fuse_rows(bs)  # (sum of out_features,)
        self.ptrs = tuple(t.data_ptr() for t in ws + bs if t is not None)
        return self.weight


def _fuse_rows(params: list[torch.Tensor]) -> torch.Tensor:
    """`params` concatenated along dim 0, each rebound to its rows of the result (held once)."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: training may use them later
        fused = torch.cat([p.detach() for p in params])
        row = 0
        for p in params:
            p.data, row = fused[row:row + p.shape[0]], row + p.shape[0]
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)
        self.wqkv = FusedLinears("wq", "wk", "wv")  # inference: one matmul for q, k and v

    def forward(self, x: torch.Tensor, b: Batch, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        N, H, KV, hd = x.shape[0], self.n_heads, self.n_kv, self.hd
        cos, sin = rope
        B, T, L = b.span()
        wqkv = self.wqkv.get(self) if cache is not None and not torch.is_grad_enabled() else None
        if wqkv is not None:  # inference: q | k | v in one matmul, RoPE once in place, k | v cached as they lie
            qkv = F.linear(x, wqkv, self.wqkv.bias)  # (N, (H + 2 KV) hd)
            apply_rope_(qkv[:, :(H + KV) * hd].view(N, H + KV, hd), cos, sin)
            q = qkv[:, :H * hd].view(N, H, hd)  # (N, H, hd)
            cache.write_packed(self.layer_id, b, qkv[:, H * hd:].view(N, 2, KV, hd))
            keys, values = cache.read(self.layer_id, b, L)  # (B, KV, L, hd) each
        else:
            q = apply_rope(self.wq(x).view(N, H, hd), cos, sin)  # (N, H, hd)
            k = apply_rope(self.wk(x).view(N, KV, hd), cos, sin)  # (N, KV, hd)
            v = self.wv(x).view(N, KV, hd)  # (N, KV, hd)
            if cache is None:  # training: whole sequences from position 0, their own keys and values
                keys = k.new_zeros(B, T, KV, hd).index_put((b.token_seq, b.token_t), k).transpose(1, 2)
                values = v.new_zeros(B, T, KV, hd).index_put((b.token_seq, b.token_t), v).transpose(1, 2)
            else:
                cache.write(self.layer_id, b, k, v)
                keys, values = cache.read(self.layer_id, b, L)  # (B, KV, L, hd) each

        if T == 1:  # decode: one token per sequence, already in batch order
            qp = q.view(B, 1, H, hd)
        else:
            qp = q.new_zeros(B, T, H, hd)
            qp[b.token_seq, b.token_t] = q
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
        )  # (B, H, T, hd)
        out = out.transpose(1, 2)  # (B, T, H, hd)
        out = out.reshape(N, H * hd) if T == 1 else out[b.token_seq, b.token_t].reshape(N, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w13 = FusedLinears("w1", "w3")  # inference: gate and up in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13 = None if torch.is_grad_enabled() else self.w13.get(self)
        if w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = F.linear(x, w13).chunk(2, -1)  # (N, hidden) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, b: Batch, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), b, rope, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The decoder, or the stage of it that owns `layer_ids` (plus embedding and/or head)."""

    def __init__(self, cfg: ModelConfig, layer_ids: Sequence[int] | None = None,
                 embed: bool = True, head: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_ids = list(range(cfg.n_layers) if layer_ids is None else layer_ids)
        # built on the meta device, weights assigned after (`load_weights`): no random init (an Embedding's
        # normal_ on meta costs ~1 s the first time in a process)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)) \
            if embed else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in self.layer_ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if head else None
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if head else None
        if head and embed and cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.tokenizer: Tokenizer | None = None  # set by `load_model`; turns str prompts into ids
        self.graphs: DecodeGraphs | None = None  # decode steps as CUDA graphs (`cuda_graphs`); off by default
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)  # signed: see rope_tables

    @property
    def is_first(self) -> bool:
        return self.tok_embeddings is not None

    @property
    def is_last(self) -> bool:
        return self.output is not None

    def new_cache(self, num_tokens: int | None = None, block_size: int = DEFAULT_BLOCK,
                  prefix_caching: bool = False) -> KVCache:
        """A paged KV cache for this stage's layers: a pool of `num_tokens` (default: a full context, >= 8192)."""
        p = next(self.parameters())
        return KVCache(self.layer_ids, self.cfg.n_kv_heads, self.cfg.head_dim, p.dtype, p.device,
                       num_tokens or max(self.cfg.max_seq_len, 8192), block_size, prefix_caching)

    def fuse_linears(self, enabled: bool | None) -> None:
        """Inference's fused q|k|v and gate|up matmuls (`FusedLinears`): True everywhere, False never, None
        (the default) on accelerators only."""
        for m in self.modules():
            for f in vars(m).values():
                if isinstance(f, FusedLinears):
                    f.enabled, f.declined = enabled, 0
        self.weights_changed()

    def cuda_graphs(self, enabled: bool | None) -> None:
        """Decode steps as CUDA graphs (`models.graphs`): None on CUDA devices only, True on any device (a CPU
        runs the padded static-shape step uncaptured: tests), False never (the default: eager)."""
        self.graphs = None if enabled is False else DecodeGraphs(enabled)

    def weights_changed(self) -> None:
        """Weights were replaced (not updated in place): captured graphs read the old ones, drop them."""
        if self.graphs is not None:
            self.graphs.clear()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Transformer:  # .to(), .cuda(), .half(): new weights
        self.weights_changed()
        return super()._apply(fn, *args, **kwargs)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a stage's tensors (`models.loading.load_state_dict`); a tied head takes the embedding."""
        state = dict(state)
        if self.output is not None and "output.weight" not in state and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]
        if self.tok_embeddings is None:
            state.pop("tok_embeddings.weight", None)
        self.weights_changed()
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} (the config wants {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:  # a config that does not describe these weights (vocab_size, hidden_size, ...)
            raise ConfigError(f"the checkpoint's tensors do not match its config: {', '.join(wrong[:3])}")
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        if self.output is not None and self.tok_embeddings is not None and self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        missing = [m for m in missing if not m.startswith("rope_")]
        if missing or unexpected:
            raise KeyError(f"stage weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, b: Batch, cache: KVCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N,) token ids on the first stage, else (N, dim) hidden states; `b` on the host or the device.

        Returns (N, dim) hidden states, or on the last stage (B, vocab) logits of each
        sequence's last new token, float32 or float64 (full logits never leave the stage).
        `logits_at`: (M,) packed token indices whose logits to return instead, (M, vocab)
        (speculative verification reads several positions per sequence).
        """
        if self.graphs is not None and logits_at is None:
            y = self.graphs.run(self, x, b, cache)  # a decode step, padded to its bucket's graph (host ints)
            if y is not None:
                return y
        b = b.to(cache.device)  # one copy of the step's ints, when the caller built them on the host
        cache.prepare(b)
        return self.step(x, b, cache, attention_mask(b), b.last_token if logits_at is None else logits_at)

    def step(self, x: torch.Tensor, b: Batch, cache: KVCache, mask: torch.Tensor | None,
             rows: torch.Tensor) -> torch.Tensor:
        """`forward` after the cache's bookkeeping (what a CUDA graph captures): `mask` (B, 1, T, L) or None,
        `rows` the packed indices whose logits the last stage returns."""
        x, rope = self._inputs(x, b)
        for layer in self.layers.values():
            x = layer(x, b, rope, cache, mask)
        if self.output is None:
            return x
        x = self.norm(x[rows])  # (B or M, dim)
        logits = self.output(x)  # (B or M, vocab)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _inputs(self, x: torch.Tensor, b: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The embedded tokens (first stage) and each token's RoPE rows (N, 1, hd)."""
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)  # (N, dim)
        pos = b.positions
        return x, (self.rope_cos[pos].to(x.dtype)[:, None, :], self.rope_sin[pos].to(x.dtype)[:, None, :])

    def train_forward(self, x: torch.Tensor, b: Batch, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Training (gradients, no cache): `b` holds whole sequences from position 0; x is (N,) ids on the
        first stage, else (N, dim) hidden states. Returns (N, dim) hidden states, or on the last stage the
        summed cross-entropy of each token's logits against `targets` (N,) (-100: not a target), in at
        least float32 (the caller divides by the batch's target count)."""
        x, rope = self._inputs(x, b)
        mask = attention_mask(b)
        for layer in self.layers.values():
            x = layer(x, b, rope, None, mask)
        if self.output is None:
            return x
        logits = self.output(self.norm(x))  # (N, vocab)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 16,
                 **sampling: Any) -> list[Completion]:
        """Single-process reference generation (`models.generate_local`, `Pipeline.generate`'s semantics)."""
        return generate_local(self, prompts, max_new_tokens, **sampling)


def attention_mask(b: Batch) -> torch.Tensor | None:
    """(B, 1, T, L) bool: query t of sequence i sees key j iff j <= starts[i] + t. None for one
    sequence decoding one token: its query sees every key (attention skips building and adding a mask)."""
    B, T, L = b.span()
    if B == 1 and T == 1:
        return None
    j = torch.arange(L, device=b.starts.device)
    if T == 1:  # decode: one query a sequence, at its start
        return (j[None, :] <= b.starts[:, None])[:, None, None]
    t = torch.arange(T, device=b.starts.device)
    limit = b.starts[:, None] + t[None, :]  # (B, T)
    return (j[None, None, :] <= limit[:, :, None])[:, None]  # padded rows still see key 0: no NaN
