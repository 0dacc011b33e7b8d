"""One training stage (a Ray actor): its layers with gradients, its optimizer, the micro-batches in flight,
and its place in the data-parallel group of the copies of its stage.

Activations go forward and their gradients come back as wire messages (`actors.wire`): checksummed,
encoded per link, encrypted when the link asks, and resent on a checksum failure, as on the serving path.
The copies of a stage sum their gradients with a torch.distributed all-reduce (gloo on CPUs, NCCL on
GPUs); each copy scaled its loss by the global batch's target count, so the sum is the exact gradient of
the global mean loss, whatever the copies' shares.
"""

from __future__ import annotations

import itertools
from collections import deque
import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch

from actors.compute import default_threads, usable_cores
from actors.wire import ChecksumError, Envelope, Header, LinkCodec, MessageError
from models import Batch, load_stage

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
GROUP_TIMEOUT_S = 120.0  # a collective waits this long for its peers before failing the step
# Outgoing messages kept for a resend (their CPU copies). Receivers ask only while they open a message, within
# the step or evaluation that sent it: a step's end, a rewind and an evaluation's end drop them all.
SENT_KEPT = 64
HISTORY = 1000  # step reports kept for the dashboard


def train_stage_name(deployment: str, stage: int, copy: int) -> str:
    """The actor name of copy `copy` of training stage `stage`."""
    return f"meshpipe/{deployment}/copy-{copy}/train-stage-{stage}"


def build_optimizer(params: list[torch.nn.Parameter], optimizer: dict[str, Any]) -> torch.optim.Optimizer:
    """`{"name": "adamw" | "sgd", **torch keywords}` -> the optimizer over `params`."""
    opt = dict(optimizer)
    cls = OPTIMIZERS[opt.pop("name", "adamw")]
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    return cls(params, **opt)


class TrainStage:
    """A stage's trainable module and optimizer (one copy of it, `copy` of the data-parallel group)."""

    def __init__(self, source: str, layers: list[int], embed: bool, head: bool, dtype: str,
                 optimizer: dict[str, Any], deployment: str, stage: int, copy: int = 0, key: bytes | None = None,
                 lora: dict[str, Any] | None = None, seed: int = 0, sharing: int = 1, max_retransmits: int = 3) -> None:
        from actors.metrics import TrainMetrics

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # this node's cores (affinity, cgroup quota), split among the `sharing` stages of the job
        torch.set_num_threads(default_threads(sharing, self.device.type, usable_cores()))
        torch.manual_seed(seed * 7919 + copy * 131 + stage)  # LoRA dropout draws here: a stream per copy and stage
        self.name = train_stage_name(deployment, stage, copy)
        self.key, self.max_retransmits = key, max_retransmits
        self.metrics = TrainMetrics(deployment, stage, copy)
        self.model = load_stage(source, layers, dtype, device=self.device, embed=embed, head=head).train()
        self.lora = None
        if lora is not None:
            from models.lora import LoraConfig, apply_lora

            self.lora = LoraConfig.from_dict(lora)
            apply_lora(self.model, self.lora, seed=seed)
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, optimizer)
        self.inflight: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # micro -> (input, output)
        self.shapes: dict[int, tuple[int, int]] = {}  # micro -> (rows, tokens a row)
        self.sent: dict[int, tuple[Header, torch.Tensor, LinkCodec]] = {}  # msg id -> what to resend
        self.msg_ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self.busy_s = 0.0  # compute since the last optimizer step
        self.counters = {"retransmits_asked": 0, "resent": 0}
        self.faults: list[tuple[str, int | None]] = []  # test hooks: ("corrupt", None) | ("crash", micro)
        self.group = 0  # data-parallel peers (0: none)
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)  # the last steps' reports (dashboards)

    # ---------- messages ----------

    def _seal(self, kind: str, step: int, micro: int, x: torch.Tensor, link: LinkCodec) -> Envelope:
        rows, cols = self.shapes[micro]
        header = Header(kind, step, next(self.msg_ids), 0, self.name, [f"m{micro}r{i}" for i in range(rows)],
                        [0] * rows, [cols] * rows)
        x = x.cpu()  # what is kept for a resend holds no device memory
        self.sent[header.msg_id] = (header, x, link)
        while len(self.sent) > SENT_KEPT:
            self.sent.pop(next(iter(self.sent)))
        env = Envelope.seal(header, x, link, self.key if link.encrypt else None, reply_to=self._me())
        if self.faults and self.faults[0][0] == "corrupt":
            self.faults.pop(0)
            env.wire = env.wire.copy()
            env.wire[-1] ^= 0xFF  # flipped in transit: the receiver's checksum catches it
        return env

    def resend(self, msg_id: int) -> Any:
        """The wire bytes of a message this stage sent (asked by a receiver whose checksum failed)."""
        if msg_id not in self.sent:
            raise MessageError(f"{self.name}: message {msg_id} is no longer kept for a resend (its step or "
                               f"evaluation ended, or over {SENT_KEPT} messages were sent since)")
        header, x, link = self.sent[msg_id]
        self.counters["resent"] += 1
        header.attempt += 1
        return Envelope.seal(header, x.cpu(), link, self.key if link.encrypt else None).wire

    def _open(self, env: Envelope, encrypted: bool) -> torch.Tensor:
        """Verifies and decodes a message; on a checksum failure asks its sender again."""
        import ray

        for asked in itertools.count():
            try:
                header, x = env.open(self.key)
                if encrypted and not header.encrypted:
                    raise MessageError(f"{self.name}: message {header.msg_id} arrived in plaintext on a link "
                                       "that encrypts: refused")
                return x.to(self.device)
            except ChecksumError:
                if asked >= self.max_retransmits or env.reply_to is None:
                    raise
                self.counters["retransmits_asked"] += 1
                log.warning("%s: message %d failed verification; asking for a resend", self.name, env.msg_id)
                env = Envelope(ray.get(env.reply_to.resend.remote(env.msg_id)), env.msg_id, reply_to=env.reply_to)
        raise AssertionError("unreachable")

    def _me(self) -> Any:
        import ray

        return ray.get_runtime_context().current_actor

    def _crash_if_asked(self, micro: int) -> None:
        if self.faults and self.faults[0] == ("crash", micro):
            log.warning("%s: crashing at micro-batch %d (test hook)", self.name, micro)
            os._exit(1)

    def inject(self, kind: str, count: int = 1, micro: int = 0) -> None:
        """Test hooks: "corrupt" the next `count` outgoing messages, or "crash" the process when the
        forward of `micro` arrives (a stage dying mid-step)."""
        if kind not in ("corrupt", "crash"):
            raise ValueError(f"fault kind {kind!r}: choose corrupt or crash")
        self.faults += [(kind, None if kind == "corrupt" else micro)] * count

    # ---------- forward and backward ----------

    def forward(self, step: int, micro: int, x: Envelope, rows: int, cols: int, links: tuple[LinkCodec, LinkCodec],
                targets: torch.Tensor | None = None, train: bool = True) -> Envelope | float:
        """A micro-batch of `rows` sequences of `cols` tokens, arriving over links[0]: its hidden states sealed
        for links[1], or (last) its summed loss. `train=False` (evaluation) keeps nothing for a backward."""
        self._crash_if_asked(micro)
        self.shapes[micro] = (rows, cols)
        inp = self._open(x, links[0].encrypt)
        b = Batch.build([str(i) for i in range(rows)], [0] * rows, [cols] * rows)
        tg = None if targets is None else targets.to(self.device)
        if not train:
            with torch.no_grad():
                out = self.model.eval().train_forward(inp, b, tg)
            self.model.train()
            return float(out) if self.model.is_last else self._seal("train", step, micro, out, links[1])
        t0 = time.perf_counter()
        if not self.model.is_first:
            inp = inp.detach().requires_grad_(True)
        out = self.model.train_forward(inp, b, tg)
        self.inflight[micro] = (None if self.model.is_first else inp, out)
        self.busy_s += time.perf_counter() - t0
        return float(out.detach()) if self.model.is_last else self._seal("train", step, micro, out.detach(), links[1])

    def backward(self, step: int, micro: int, grad: Envelope | None, links: tuple[LinkCodec, LinkCodec],
                 scale: float = 1.0) -> Envelope | None:
        """The micro-batch's backward, from its loss x `scale` (last) or the next stage's gradient (arriving
        over links[1]); returns the gradient of its input sealed for links[0] (None on the first stage)."""
        t0 = time.perf_counter()
        inp, out = self.inflight.pop(micro)
        if self.model.is_last:
            (out * scale).backward()
        else:
            out.backward(self._open(grad, links[1].encrypt))
        self.busy_s += time.perf_counter() - t0
        if inp is None:
            return None
        return self._seal("grad", step, micro, inp.grad, links[0])

    # ---------- tied embeddings, data parallelism, clipping, the step ----------

    def tied_grad(self) -> Any:
        """The gradient of this stage's copy of a tied embedding, as numpy (`to_numpy`): the head's is dense
        (last stage); the embedding's (first) has rows only for the batch's tokens, so only those travel,
        as (row ids, rows)."""
        w = self.model.tok_embeddings if self.model.is_first else self.model.output
        if w is None or w.weight.grad is None:
            return None
        g = w.weight.grad
        if self.model.is_first:
            rows = g.ne(0).any(dim=1).nonzero().squeeze(1)  # (R,) rows some token of the batch touched
            return to_numpy({"rows": rows, "values": g.index_select(0, rows)})
        return to_numpy(g)

    def add_tied_grad(self, grad: Any) -> None:
        """Adds the other stage's `tied_grad` (adding the zero rows left out would change nothing)."""
        w = self.model.tok_embeddings if self.model.is_first else self.model.output
        if grad is None or w.weight.grad is None:
            return
        grad = to_torch(grad)
        if isinstance(grad, dict):
            w.weight.grad.index_add_(0, grad["rows"].to(self.device), grad["values"].to(self.device))
        else:
            w.weight.grad += grad.to(self.device)

    def group_address(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0 hosts the copies' rendezvous there."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join_group(self, address: str, port: int, rank: int, world: int) -> None:
        """Joins (or, after a copy was replaced, re-forms) the data-parallel group of this stage's copies."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        self.group = world

    def all_reduce(self) -> None:
        """Sums the trainable gradients over the copies (one flat buffer per dtype)."""
        import torch.distributed as dist

        if self.group < 2:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def grad_sq(self, skip_tied: bool = False) -> float:
        """The sum of squared gradients (a tied head's copy left out: the first stage counts the tensor)."""
        skip = self.model.output.weight if skip_tied and self.model.output is not None else None
        return float(sum((p.grad.double() ** 2).sum() for p in self.params if p.grad is not None and p is not skip))

    def scale_grads(self, factor: float) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def busy(self) -> float:
        """Seconds this stage computed since the last optimizer step."""
        return self.busy_s

    def step(self, lr: float | None = None, report: dict[str, Any] | None = None) -> None:
        """The optimizer step (at learning rate `lr` when a schedule sets it). `report`: the step's loss,
        tokens, seconds and bubble fraction, for the metrics."""
        if report is not None:
            self.metrics.step(report["loss"], report["tokens"], report["seconds"], report["bubble"])
            self.history.append(report)
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inflight.clear()
        self.forget_sent()  # every message of the step was opened: none will be asked again
        self.busy_s = 0.0

    def forget_sent(self) -> None:
        """Drops the messages kept for a resend (and the micro-batches' shapes): at a step's or an
        evaluation's end, when every receiver has opened them."""
        self.sent.clear()
        self.shapes.clear()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, **self.counters, "trainable": sum(p.numel() for p in self.params),
                "kept_for_resend": len(self.sent), "history": list(self.history)}

    # ---------- state ----------

    def state_dict(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """Parameters under the model's names (LoRA merged into its base weights unless `merged=False`:
        then the LoRA tensors only)."""
        if self.lora is not None:
            from models.lora import lora_state_dict, merged_state_dict

            sd = merged_state_dict(self.model) if merged else lora_state_dict(self.model)
        else:
            sd = self.model.state_dict()
        return {k: v.detach().cpu().clone() for k, v in sd.items() if not k.startswith("rope_")}

    def checkpoint(self) -> dict[str, Any]:
        """What training changes (trainable tensors, optimizer state): a step boundary to return to, as numpy
        arrays (Ray stores them with one copy, no pickling of tensors). The copies of a stage hold the
        same; each keeps its own RNG (`rng_state`)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return to_numpy({"params": {names[id(p)]: p.detach() for p in self.params},
                         "optimizer": self.optimizer.state_dict()})

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The RNG streams this stage draws from: the CPU's, and its GPU's when it runs on one (dropout on a
        GPU draws from the GPU's generator)."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any], rng: dict[str, torch.Tensor] | torch.Tensor | None = None) -> None:
        """Back to a `checkpoint` (and RNG state): nothing in flight."""
        state = to_torch(state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(rng, torch.Tensor):  # a checkpoint saved before GPU states were kept: the CPU's only
            rng = {"cpu": rng}
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.inflight.clear()
        self.forget_sent()
        self.busy_s = 0.0


def to_numpy(tree: Any) -> Any:
    """Tensors in nested dicts / lists as numpy arrays (bfloat16 as ("bfloat16", its bits as int16))."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach().cpu()
        return ("bfloat16", t.view(torch.int16).numpy()) if t.dtype == torch.bfloat16 else t.numpy()
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_numpy(v) for v in tree]
    return tree


def to_torch(tree: Any) -> Any:
    """`to_numpy`'s inverse (the arrays are copied: Ray's are read-only)."""
    import numpy as np

    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree.copy())
    if isinstance(tree, tuple) and len(tree) == 2 and tree[0] == "bfloat16":
        return torch.from_numpy(tree[1].copy()).view(torch.bfloat16)
    if isinstance(tree, dict):
        return {k: to_torch(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_torch(v) for v in tree]
    return tree
