"""A pipeline with nothing in it but the stages: the reference that bounds any process-per-stage
pipeline on this machine.

`PlainRing(source, stages)` starts S plain Python processes (no Ray, no router), each loading only
its own layers, split as a deployment splits them (`actors.layout.partition`), with the torch
threads a meshpipe stage takes for one lane (every usable core) and the stages' OpenMP spin
(`GOMP_SPINCOUNT`, the deploy default).
OS pipes join them in a ring: stage 0 embeds and runs its layers and sends the hidden states on, the
last stage samples greedily and sends the tokens back to stage 0, which feeds the next step. No
message encoding, checksums, output history, reports or scheduling: what a step costs here beyond
one process is the stages taking turns on shared cores (cold caches, OpenMP's workers) and the pipes.

`run(prompt, batch, new_tokens)` is a greedy generation of `new_tokens` for `batch` copies of
`prompt`, the prefill included (as `Pipeline.generate` is timed): (seconds, tokens of each sequence).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

START_TIMEOUT_S = 300.0  # every stage has loaded its layers within this
RUN_TIMEOUT_S = 600.0  # one generation
CHILD = "import sys; from actors.bench.plain import _child; _child(sys.argv[1])"  # a stage process's code


@dataclass
class _Part:
    """What one plain stage process needs to build its module."""

    source: str
    layers: list[int]
    embed: bool  # the first stage: token ids in
    head: bool  # the last stage: logits out, sampled here
    threads: int  # torch threads
    pool_tokens: int  # its KV cache's pool


def _child(spec: str) -> None:
    """A stage process's entry (`python -c`): its part and its pipes' descriptors, as JSON."""
    d = json.loads(spec)
    fds = d.pop("fds")
    _stage_main(_Part(**d), Connection(fds[0], writable=False), Connection(fds[1], readable=False),
                Connection(fds[2], readable=False))


def _stage_main(part: _Part, inbound: Any, outbound: Any, control: Any) -> None:
    """One plain stage: receive, compute, send on, until "stop". `control` says when the layers are
    loaded; stage 0 also takes the driver's "run" commands on `inbound` (and the last stage's tokens on
    the same pipe) and answers each on `control`."""
    import torch

    from models.batch import Batch
    from models.loading import load_stage

    torch.set_num_threads(part.threads)
    model = load_stage(part.source, part.layers, embed=part.embed, head=part.head)
    dtype = next(model.parameters()).dtype
    cache = model.new_cache(part.pool_tokens)
    control.send(True)

    @torch.inference_mode()
    def forward(ids: list[str], starts: list[int], lengths: list[int], x: torch.Tensor) -> torch.Tensor:
        return model(x, Batch.build(ids, starts, lengths), cache)

    while True:
        msg = inbound.recv()
        kind = msg[0]
        if kind == "run":  # stage 0: the driver's generation
            control.send(_generate(forward, cache, inbound, outbound, *msg[1:]))
            continue
        if kind == "free":
            cache.free(msg[1])
        elif kind == "step":
            _, ids, starts, lengths, body, shape = msg
            x = torch.frombuffer(bytearray(body), dtype=torch.float32).view(shape).to(dtype)  # (N, dim)
            y = forward(ids, starts, lengths, x)
            if part.head:  # (B, vocab) logits: greedy tokens back to stage 0
                outbound.send(("tokens", y.argmax(-1).tolist()))
                continue
            msg = (kind, ids, starts, lengths, y.float().numpy().tobytes(), tuple(y.shape))
        if not part.head:  # "free" and "stop" go down the ring and end at the last stage
            outbound.send(msg)
        if kind == "stop":
            return


def _generate(forward: Any, cache: Any, inbound: Any, outbound: Any, prompt: list[int], batch: int,
              new_tokens: int) -> tuple[float, list[list[int]]]:
    """Stage 0's loop: each step's inputs through its layers and on; the tokens come back on `inbound`."""
    from models.batch import long_tensor

    ids = [f"plain-{time.monotonic_ns()}-{i}" for i in range(batch)]
    seqs = [list(prompt) for _ in range(batch)]
    cached = [0] * batch
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        inputs = [s[c:] for s, c in zip(seqs, cached)]
        lengths = [len(x) for x in inputs]
        y = forward(ids, cached, lengths, long_tensor([t for x in inputs for t in x]))  # (N, dim)
        outbound.send(("step", ids, list(cached), lengths, y.float().numpy().tobytes(), tuple(y.shape)))
        kind, tokens = inbound.recv()
        for i, t in enumerate(tokens):
            cached[i] += lengths[i]
            seqs[i].append(t)
    seconds = time.perf_counter() - t0
    cache.free(ids)
    outbound.send(("free", ids, [], [], b"", ()))
    return seconds, [s[len(prompt):] for s in seqs]


class PlainRing:
    """S plain stage processes in a ring over OS pipes (module docstring); `close()` ends them."""

    def __init__(self, source: str, stages: int, threads: int | None = None, spin_count: int | None = 50_000,
                 pool_tokens: int = 8192) -> None:
        from actors.compute import usable_cores
        from actors.layout import partition
        from models.loading import read_config, resolve_source

        if stages < 2:
            raise ValueError("a plain ring needs at least 2 stages")
        path = str(resolve_source(source))
        cfg = read_config(path)
        if cfg.n_layers < stages:
            raise ValueError(f"{cfg.n_layers} layers cannot make {stages} stages")
        specs = partition(cfg, num_stages=stages)  # the layers each stage of a deployment gets
        self.layers = [list(spec.layers) for spec in specs]
        self.threads = threads or usable_cores()
        env = {} if spin_count is None or {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys() \
            else {"GOMP_SPINCOUNT": str(spin_count)}
        self.spin_count = env.get("GOMP_SPINCOUNT", os.environ.get("GOMP_SPINCOUNT"))
        links = [os.pipe() for _ in range(stages)]  # links[i]: (read, write) into stage i
        controls = [os.pipe() for _ in range(stages)]  # each stage's answers to the driver
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(stages):
                part = _Part(path, list(specs[i].layers), embed=specs[i].embed, head=specs[i].head,
                             threads=self.threads, pool_tokens=pool_tokens)
                fds = [links[i][0], links[(i + 1) % stages][1], controls[i][1]]
                spec = json.dumps({**asdict(part), "fds": fds})
                self.procs.append(subprocess.Popen([sys.executable, "-c", CHILD, spec], pass_fds=fds,
                                                   env={**os.environ, **env}))
        finally:  # the driver keeps a writer into stage 0 (its commands) and the answers' readers
            for i, (r, w) in enumerate(links):
                os.close(r)
                if i:
                    os.close(w)
            for _, w in controls:
                os.close(w)
        self.to_head = Connection(links[0][1], readable=False)
        self.answers = [Connection(r, writable=False) for r, _ in controls]
        try:
            for i, c in enumerate(self.answers):
                if not c.poll(START_TIMEOUT_S):
                    raise RuntimeError(f"plain stage {i} did not load its layers in {START_TIMEOUT_S:g} s")
                try:
                    c.recv()
                except EOFError:
                    raise RuntimeError(f"plain stage {i} exited while loading its layers (its stderr says why)") \
                        from None
        except BaseException:
            self.close()
            raise

    def run(self, prompt: Sequence[int], batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
        """A greedy generation: (seconds, each sequence's new tokens)."""
        self.to_head.send(("run", list(prompt), batch, new_tokens))
        if not self.answers[0].poll(RUN_TIMEOUT_S):
            raise RuntimeError(f"the plain ring took over {RUN_TIMEOUT_S:g} s")
        return self.answers[0].recv()

    def close(self) -> None:
        try:
            self.to_head.send(("stop",))
        except (OSError, AttributeError):
            pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for c in [getattr(self, "to_head", None), *getattr(self, "answers", [])]:
            if c is not None:
                c.close()

    def __enter__(self) -> PlainRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plain_row(ring: PlainRing, prompt: Sequence[int], batch: int, new_tokens: int, repeats: int,
              reference: Sequence[int] | None = None) -> dict[str, Any]:
    """The plain ring's figure at `batch` (best of `repeats` after a warm-up), as `bench pipeline` prints it;
    `reference`: the one-process greedy tokens, which every sequence must repeat."""
    ring.run(prompt, batch, min(new_tokens, 4))  # warm: the first calls of each shape are slow
    runs = [ring.run(prompt, batch, new_tokens) for _ in range(repeats)]
    best = min(sec for sec, _ in runs)
    row = {"bench": "plain_processes", "stages": len(ring.procs), "batch": batch, "new_tokens": new_tokens,
           "threads_per_stage": ring.threads, "gomp_spincount": ring.spin_count,
           "ms_per_step": best / new_tokens * 1e3, "tokens_per_s": batch * new_tokens / best}
    if reference is not None:
        row["same_tokens_as_one_process"] = all(t == list(reference) for _, out in runs for t in out)
    return row
