"""Training through stage actors: `PipelineTrainer` runs a schedule's plan (`topology.schedule`) over
D data-parallel copies of a pipeline of S stage actors (`actors.train_stage`). Activations go forward and
their gradients come back stage to stage as wire messages in Ray objects (the driver holds references
only); the copies of a stage sum their gradients with a torch.distributed all-reduce; each stage steps
its own optimizer.

A step's loss is the token-level cross-entropy averaged over every target token of the global batch
(each row predicts its next tokens, as transformers does with `labels=input_ids`), so it depends on
neither S, D nor the micro-batches. With tied embeddings the first and last stages of each copy add
each other's gradient before stepping, so the tie survives training.

Faults: after each step the trainable state of copy 0's stages (all copies hold the same) and every
actor's RNG stay in the object store; a stage that dies mid-step (or mid-evaluation) is replaced, every
stage returns to that boundary, the copies' groups are re-formed, and the step is redone: the run ends
with the weights an undisturbed run has. A step that still fails after MAX_REDOS redos leaves every
stage at the boundary too, so retrying it applies its gradients once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from actors.errors import DeploymentError, StageFailedError
from actors.layout import partition
from actors.naming import NAMESPACE
from actors.train_checkpoint import TrainerCheckpoints
from actors.train_stage import OPTIMIZERS, TrainStage, build_optimizer, train_stage_name
from actors.wire import Envelope, Header, LinkCodec, LinkInfo, choose_link, codec_names, load_key, subkey
from models import ConfigError, InvalidRequestError
from models.config import resolve_dtype
from models.loading import read_config, resolve_source
from topology.schedule import LR_SCHEDULES, SCHEDULES, deal, lr_at, plan, submission_order, theoretical_bubble

log = logging.getLogger(__name__)

MAX_REDOS = 3  # a step (or an evaluation) redone this often after failures before the trainer gives up
LOSSLESS = ("auto", "none")
# Tokens an evaluation micro-batch holds at most (one row, when a row is longer): the last stage's logits
# are this many x the vocabulary (SmolLM2's 49k: 0.8 GB in float32, twice that through the log-softmax),
# whatever the size of the held-out split; a split of more runs as more micro-batches.
EVAL_TOKENS = 4096
T = TypeVar("T")


@dataclass
class StepResult:
    loss: float  # the global mean loss of this step's forward pass, before the update
    tokens: int  # target tokens in the batch
    micro_batches: int  # over all copies
    seconds: float = 0.0  # wall time of the step
    bubble: float = 0.0  # measured idle fraction: 1 - stages' compute / (stages x copies x wall time)
    theoretical_bubble: float = 0.0  # (S - 1) / (M + S - 1), M the micro-batches a copy runs
    lr: float | None = None  # the learning rate this step used (None: the optimizer's own)
    redone: int = 0  # times the step was redone after a stage died


class PipelineTrainer(TrainerCheckpoints):
    """Trains a model split into stage actors along a schedule's plan; `step(batch)` is one optimizer step."""

    def __init__(self, config: dict[str, Any], grid: list[list[Any]], spawn: Callable[[int, int], Any],
                 tied: bool, key: bytes | None) -> None:
        self.config = config  # what `deploy` was given (`save` keeps it for `resume`)
        self.grid = grid  # grid[copy][stage]: the actors
        self._spawn = spawn  # (copy, stage) -> a new actor for that place
        self.schedule, self.micro_batches = config["schedule"], config["micro_batches"]
        self.seq_len, self.source = config["seq_len"], config["source"]
        self.vocab_size: int = config.pop("vocab_size")  # token ids of a batch must be below it
        self.tied = tied and len(grid[0]) > 1
        self.key = key  # the wire key (encrypted links), derived for this deployment
        self.steps = 0  # optimizer steps taken
        self.data: dict[str, int] = {}  # fit's stream of batches: seed, batch_size, batches drawn (saved)
        self.speeds = [1.0] * len(grid)  # each copy's rows a second, measured ("speed" balance)
        self.redone = 0  # steps (and evaluations) redone after failures, over the run
        self.broken = ""  # why the trainer cannot go on (a recovery that failed), else empty
        self._links = self._plan_links()
        self._boundary = self._snapshot()

    @property
    def stages(self) -> list[Any]:
        """Copy 0's stage actors."""
        return self.grid[0]

    @classmethod
    def deploy(cls, source: str, num_stages: int = 2, *, layers_per_stage: int | None = None,
               data_parallel: int = 1, schedule: str = "1f1b", micro_batches: int = 4,
               optimizer: dict[str, Any] | None = None, lr_schedule: dict[str, Any] | None = None,
               grad_clip: float | None = None, lora: dict[str, Any] | None = None, dtype: str = "float32",
               seq_len: int | None = None, name: str = "train", balance: str = "even", seed: int = 0,
               stage_resources: dict[str, Any] | None = None, wire: dict[str, Any] | None = None) -> PipelineTrainer:
        """Starts D x S training actors (layers split as `Pipeline.deploy` splits them: by compute into
        `num_stages`, or `layers_per_stage` layers a stage; one GPU each by default, CPUs when the cluster
        has none) and forms each stage's data-parallel group. A trainer of the same `name` still running
        in the cluster is refused (DeploymentError): shut it down first, or give another name."""
        import ray

        from actors.config import WireOptions
        from actors.pipeline import stage_resources as choose_resources

        config = dict(source=source, num_stages=num_stages, layers_per_stage=layers_per_stage,
                      data_parallel=data_parallel, schedule=schedule, micro_batches=micro_batches,
                      optimizer=optimizer if optimizer is not None else {"name": "adamw"}, lr_schedule=lr_schedule,
                      grad_clip=grad_clip,
                      lora=lora, dtype=dtype, seq_len=seq_len, name=name, balance=balance, seed=seed,
                      stage_resources=stage_resources, wire=wire)
        if wire is not None and not isinstance(wire, dict):
            raise ConfigError(f"wire={wire!r}: give a dict of options (or leave it out)")
        w = WireOptions(**(wire or {}))
        path = str(resolve_source(source))
        cfg = read_config(path)
        _check(config, cfg.max_seq_len, w.codec)
        config["optimizer"] = dict(config["optimizer"])  # the caller's dict stays theirs
        if lora is not None:
            from models.lora import LoraConfig

            LoraConfig.from_dict(lora)  # a bad key or value fails here, before any actor starts
        specs = partition(cfg, layers_per_stage=layers_per_stage) if layers_per_stage is not None \
            else partition(cfg, num_stages)
        D, S = data_parallel, len(specs)
        resources = choose_resources(D * S, stage_resources)  # fails fast when the cluster lacks GPUs
        key = load_key(w.encryption_key.get_secret_value() if w.encryption_key else None) \
            if w.encryption != "never" else None
        wire_key = subkey(key, f"wire:train:{name}") if key is not None else None
        actor = ray.remote(TrainStage)

        def spawn(copy: int, s: int) -> Any:
            sp = specs[s]
            return actor.options(name=train_stage_name(name, s, copy), namespace=NAMESPACE, max_restarts=0,
                                 **resources).remote(path, list(sp.layers), sp.embed, sp.head, dtype,
                                                     config["optimizer"], name, s, copy, wire_key, lora, seed,
                                                     sharing=D * S, max_retransmits=w.max_retransmits)

        grid: list[list[Any]] = []
        try:
            for d in range(D):
                grid.append([])
                for s in range(S):
                    grid[d].append(spawn(d, s))
        except ray.exceptions.ActorAlreadyExistsError:
            _kill(grid)
            raise DeploymentError(f"a trainer named {name!r} is still running in this Ray cluster (its stage "
                                  f"actors hold the names): shut it down first (`tr.shutdown()`), or deploy "
                                  f"(or resume) under another name=") from None
        config.update(source=path, seq_len=seq_len or cfg.max_seq_len, wire_options=w)
        config["vocab_size"] = cfg.vocab_size  # not saved: read from the source again on resume
        try:
            tr = cls(config, grid, spawn, cfg.tie_embeddings, wire_key)
            tr._form_groups()
        except Exception:
            _kill(grid)
            raise
        return tr

    # ---------- links, groups, boundaries ----------

    def _plan_links(self) -> list[list[LinkCodec]]:
        """Per copy, the link into each stage (links[0]: from the driver) and out of the last (unused)."""
        import ray

        w = self.config["wire_options"]
        out = []
        for row in self.grid:
            hosts = ray.get([a.node_id.remote() for a in row])
            into = [LinkCodec(encrypt=w.encryption == "always")]  # token ids from the driver
            for a, b in zip(hosts, hosts[1:]):
                into.append(choose_link(LinkInfo(same_host=a == b, bandwidth_gbps=None), w.codec, w.compress,
                                        w.encryption, block=w.int8_block))
            out.append([*into, LinkCodec()])
        return out

    def _form_groups(self) -> None:
        """Each stage's copies form (or re-form) their all-reduce group."""
        import ray

        D = len(self.grid)
        if D < 2:
            return
        calls = []
        for s in range(len(self.grid[0])):
            addr, port = ray.get(self.grid[0][s].group_address.remote())
            calls += [self.grid[d][s].join_group.remote(addr, port, d, D) for d in range(D)]
        ray.get(calls)

    def _snapshot(self) -> tuple[list[Any], list[list[Any]]]:
        """The step boundary: copy 0's trainable state per stage, every actor's RNG (references only)."""
        return ([a.checkpoint.remote() for a in self.grid[0]],
                [[a.rng_state.remote() for a in row] for row in self.grid])

    def _recover(self, what: str, error: Exception, redo: bool = True) -> None:
        """Replaces dead actors, returns every stage to the last boundary and re-forms the groups; if that
        fails the trainer is broken (StageFailedError)."""
        import ray

        log.warning("%s failed (%s): replacing dead stages and %s", what, type(error).__name__,
                    "redoing it" if redo else "returning every stage to the last step boundary")
        try:
            for attempt in range(MAX_REDOS + 1):  # another stage may die while this one is replaced
                for d, row in enumerate(self.grid):
                    for s, a in enumerate(row):
                        try:
                            ray.get(a.node_id.remote(), timeout=30)
                        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                            log.warning("%s is dead: starting a replacement",
                                        train_stage_name(self.config["name"], s, d))
                            ray.kill(a)
                            row[s] = self._respawn(d, s)
                try:
                    self._rewind()
                    self._links = self._plan_links()
                    self._form_groups()
                    return
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                        ray.exceptions.GetTimeoutError) as e:
                    log.warning("recovering the trainer failed (%s): trying again", type(e).__name__)
            self.broken = "could not return its stages to the last step boundary"
        except Exception as e:  # noqa: BLE001 - a replacement that would not start: the trainer cannot go on
            self.broken = f"could not return its stages to the last step boundary ({type(e).__name__}: {e})"
        raise self._broken_error()

    def _broken_error(self) -> StageFailedError:
        return StageFailedError(f"the trainer {self.broken}: shut it down (`tr.shutdown()`) and resume "
                                "its last save (`PipelineTrainer.resume`)")

    def _redoing(self, what: str, attempt: Callable[[], T]) -> tuple[T, int]:
        """`attempt()` and the redos it took: after a stage died (or lost a peer) every stage returns to the
        last step boundary and it runs again, at most MAX_REDOS times; a task that failed on its own (a
        bug) raises its error. Either way nothing of a failed attempt reaches the next step."""
        import ray

        if self.broken:
            raise self._broken_error()
        for redo in range(MAX_REDOS + 1):
            try:
                return attempt(), redo
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                if isinstance(e, ray.exceptions.RayTaskError) and not _lost_peer(e):
                    self._rewind()  # no gradient or micro-batch of the failed attempt reaches the next step
                    raise e.as_instanceof_cause() from None
                if redo == MAX_REDOS:  # at the boundary again (or broken), so a retry applies its step once
                    self._recover(what, e, redo=False)
                    raise StageFailedError(f"{what} failed {redo + 1} times (last: {type(e).__name__}); "
                                           f"every stage is back at step {self.steps}: check the stage "
                                           "actors' logs, then retry") from None
                self.redone += 1
                self._recover(what, e)
        raise AssertionError("unreachable")

    def _rewind(self) -> None:
        """Every actor back at the last step boundary (its tasks run in order: stray backwards end first)."""
        import ray

        states, rngs = self._boundary
        ray.get([a.restore.remote(states[s], rngs[d][s]) for d, row in enumerate(self.grid) for s, a in enumerate(row)])

    def _respawn(self, copy: int, stage: int) -> Any:
        deadline = time.monotonic() + 30
        while True:  # the dead actor's name is released a moment after it dies
            try:
                return self._spawn(copy, stage)
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # ---------- steps ----------

    def _rows(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as [rows, tokens] ids and each row's next-token targets (-100 after the last)."""
        ids = torch.as_tensor(batch, dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
            raise ConfigError(f"a batch is [rows, tokens] with at least 2 tokens a row, got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.seq_len:
            raise ConfigError(f"rows of {ids.shape[1]} tokens are longer than seq_len={self.seq_len}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:  # before any stage runs (a GPU would assert)
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size}): the batch holds "
                                      f"{int(ids.min())}..{int(ids.max())}")
        targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
        return ids, targets

    def _split(self, ids: torch.Tensor, targets: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per copy, its micro-batches (ids, flat targets): D x M micro-batches dealt by the copies' speeds."""
        D = len(self.grid)
        n = min(D * self.micro_batches, ids.shape[0])
        parts = list(zip(torch.tensor_split(ids, n), torch.tensor_split(targets, n)))
        counts = deal(n, self.speeds if self.config["balance"] == "speed" else [1.0] * D)
        out, at = [], 0
        for c in counts:
            out.append([(i, t.reshape(-1)) for i, t in parts[at:at + c]])
            at += c
        return out

    def _ids_message(self, ids: torch.Tensor, link: LinkCodec) -> Envelope:
        rows = ids.shape[0]
        header = Header("train", self.steps, 0, 0, "driver", [f"r{i}" for i in range(rows)], [0] * rows,
                        [ids.shape[1]] * rows)
        return Envelope.seal(header, ids.reshape(-1), link, self.key if link.encrypt else None)

    def _submit(self, copy: int, micros: list[tuple[torch.Tensor, torch.Tensor]], total: int) -> tuple[list, list]:
        """Submits one copy's plan; returns (loss refs, first-stage backward refs)."""
        row, links = self.grid[copy], self._links[copy]
        S, M = len(row), len(micros)
        if M == 0:
            return [], []
        acts: dict[tuple[int, int], Any] = {}
        grads: dict[tuple[int, int], Any] = {}
        losses = []
        for s, a in submission_order(plan(self.schedule, S, M)):
            m, st = a.micro, row[s]
            rows, cols = micros[m][0].shape
            io = (links[s], links[s + 1])
            if a.kind == "F":
                x = self._ids_message(micros[m][0], links[0]) if s == 0 else acts[(s - 1, m)]
                acts[(s, m)] = st.forward.remote(self.steps, m, x, rows, cols, io,
                                                 micros[m][1] if s == S - 1 else None)
                if s == S - 1:
                    losses.append(acts[(s, m)])
            else:
                grads[(s, m)] = st.backward.remote(self.steps, m, None if s == S - 1 else grads[(s + 1, m)], io,
                                                   1.0 / total)
        return losses, [grads[(0, m)] for m in range(M)]

    def step(self, batch: Any) -> StepResult:
        """One optimizer step on `batch` (token-id rows of equal length, a list or a [B, T] tensor)."""
        ids, targets = self._rows(batch)
        total = int((targets != -100).sum())
        result, redone = self._redoing(f"training step {self.steps + 1}",
                                       lambda: self._step(ids, targets, total))
        result.redone = redone
        return result

    def _step(self, ids: torch.Tensor, targets: torch.Tensor, total: int) -> StepResult:
        import ray

        t0 = time.perf_counter()
        shares = self._split(ids, targets)
        subs = [self._submit(d, micros, total) for d, micros in enumerate(shares)]
        losses = ray.get([r for lo, _ in subs for r in lo])
        ray.get([r for _, g in subs for r in g])
        if self.tied:
            for row in self.grid:
                g0, gl = row[0].tied_grad.remote(), row[-1].tied_grad.remote()
                ray.get([row[0].add_tied_grad.remote(gl), row[-1].add_tied_grad.remote(g0)])
        if len(self.grid) > 1:
            ray.get([a.all_reduce.remote() for row in self.grid for a in row])
        if self.config["grad_clip"] is not None:  # torch.nn.utils.clip_grad_norm_ over the whole model
            S = len(self.grid[0])
            norm = sum(ray.get([a.grad_sq.remote(self.tied and i == S - 1) for i, a in enumerate(self.grid[0])]))
            factor = min(1.0, self.config["grad_clip"] / (norm ** 0.5 + 1e-6))
            ray.get([a.scale_grads.remote(factor) for row in self.grid for a in row])
        lr = self._lr(self.steps + 1)
        loss = sum(losses) / total
        busy = [ray.get([a.busy.remote() for a in row]) for row in self.grid]
        S, D = len(self.grid[0]), len(self.grid)
        wall = time.perf_counter() - t0
        bubble = max(0.0, 1.0 - sum(map(sum, busy)) / (S * D * wall))
        ray.get([a.step.remote(lr, {"step": self.steps + 1, "loss": loss, "tokens": _tokens(micros), "seconds": wall,
                                    "bubble": bubble, "batch_tokens": total, "at": time.time()})
                 for row, micros in zip(self.grid, shares) for a in row])
        snapshot = self._snapshot()
        ray.get([r for row in snapshot[1] for r in row])  # every actor took it (in order, after its state): a
        self.steps += 1  # stage that died before then has this step redone from the boundary before it
        self._boundary = snapshot
        for d, (b, micros) in enumerate(zip(busy, shares)):
            rows = sum(m[0].shape[0] for m in micros)
            if rows and sum(b) > 0:
                self.speeds[d] = rows / sum(b)
        return StepResult(loss, total, sum(len(m) for m in shares), wall, bubble,
                          theoretical_bubble(S, max(len(m) for m in shares)), lr)

    def _lr(self, step: int) -> float | None:
        sched = self.config["lr_schedule"]
        if not sched:
            return None
        base = self.config["optimizer"].get("lr", 1e-3)
        return lr_at(step, base, **sched)

    def evaluate(self, batch: Any) -> float:
        """The mean loss of `batch` with the current weights (no update); perplexity is its exp. It runs
        through copy 0 in micro-batches of at most EVAL_TOKENS tokens, a few in flight, so its memory does
        not grow with the batch; a stage that dies meanwhile is replaced and the evaluation redone (between
        steps the weights are the boundary's)."""
        ids, targets = self._rows(batch)
        total = int((targets != -100).sum())
        summed, _ = self._redoing(f"evaluation at step {self.steps}", lambda: self._evaluate(ids, targets))
        return summed / total

    def _evaluate(self, ids: torch.Tensor, targets: torch.Tensor) -> float:
        """The summed loss of the rows' targets: EVAL_TOKENS-token micro-batches through copy 0, at most two
        a stage in flight (every stage busy; the messages held stay bounded)."""
        import ray

        row, links = self.grid[0], self._links[0]
        per = max(1, EVAL_TOKENS // ids.shape[1])  # rows an evaluation micro-batch
        flight: deque[Any] = deque()
        summed = 0.0
        for m, (i, t) in enumerate(zip(ids.split(per), targets.split(per))):
            if len(flight) >= 2 * len(row):
                summed += ray.get(flight.popleft())
            x: Any = self._ids_message(i, links[0])
            for s, st in enumerate(row):
                x = st.forward.remote(self.steps, m, x, *i.shape, (links[s], links[s + 1]),
                                      t.reshape(-1) if s == len(row) - 1 else None, False)
            flight.append(x)
        for x in flight:
            summed += ray.get(x)
        ray.get([a.forget_sent.remote() for a in row])  # every message was opened: none will be asked again
        return summed

    def fit(self, data: Any, steps: int, batch_size: int = 8, held_out: float = 0.1, eval_every: int = 0,
            seed: int = 0, on_step: Callable[[dict[str, float]], None] | None = None,
            checkpoint_every: int = 0, checkpoint_dir: str | None = None) -> list[dict[str, float]]:
        """Trains `steps` steps on `data` (a text file, texts or token-id lists: `models.data`), packed in
        `seq_len` windows, `batch_size` windows a step drawn with `seed`; every `eval_every` steps the
        held-out windows' loss too (and before the first, as step 0, and after the last, so the run ends measured). Returns one record a step: step, loss,
        tokens, seconds (and eval_loss); `on_step` sees each training step's record as it comes (a progress bar).
        Every `checkpoint_every` steps (the trainer's step count) it `save`s to `checkpoint_dir`, replacing
        the previous checkpoint whole: `resume` it and `fit` the rest with the same data and seed, and the
        run continues as if never stopped."""
        from models.data import load_documents, pack_windows, split_held_out

        if steps < 1 or batch_size < 1:
            raise ConfigError(f"steps={steps} and batch_size={batch_size} must be at least 1")
        if checkpoint_every < 0 or checkpoint_every and not checkpoint_dir:
            raise ConfigError(f"checkpoint_every={checkpoint_every}: give a number of steps >= 0, and a "
                              "checkpoint_dir to save in when it is above 0")
        tokenizer, eos = self._tokenizer()
        train, held = split_held_out(pack_windows(load_documents(data), self.seq_len, tokenizer, eos), held_out, seed)
        gen = torch.Generator().manual_seed(seed)
        if self.data.get("seed") != seed or self.data.get("batch_size") != batch_size:
            self.data = {"seed": seed, "batch_size": batch_size, "batches": 0}  # a new stream of batches
        for _ in range(self.data["batches"]):  # a resumed run continues its stream where it stopped
            torch.randint(len(train), (batch_size,), generator=gen)
        history: list[dict[str, float]] = []
        if eval_every and len(held):  # where the held-out loss starts
            history.append({"step": self.steps, "eval_loss": self.evaluate(held)})
        for n in range(steps):
            r = self.step(train[torch.randint(len(train), (batch_size,), generator=gen)])
            self.data["batches"] += 1
            i = self.steps
            rec: dict[str, float] = {"step": i, "loss": r.loss, "tokens": r.tokens, "seconds": r.seconds}
            if eval_every and (i % eval_every == 0 or n == steps - 1) and len(held):
                rec["eval_loss"] = self.evaluate(held)
            history.append(rec)
            if checkpoint_every and i % checkpoint_every == 0:
                self.save(str(checkpoint_dir))
            if on_step is not None:
                on_step(rec)
        return history

    def _tokenizer(self) -> tuple[Any, int | None]:
        from models.tokenizer import load_tokenizer

        cfg = read_config(self.source)
        return load_tokenizer(resolve_source(self.source)), (cfg.eos_ids[0] if cfg.eos_ids else None)

    def inject(self, stage: int, kind: str, count: int = 1, micro: int = 0, copy: int = 0) -> None:
        """Test hook: a fault in one stage actor (`TrainStage.inject`: "corrupt" messages or a "crash")."""
        import ray

        ray.get(self.grid[copy][stage].inject.remote(kind, count, micro))

    def stats(self) -> list[list[dict[str, Any]]]:
        """Per copy and stage: the actor's name, message counters and trainable parameter count."""
        import ray

        return [ray.get([a.stats.remote() for a in row]) for row in self.grid]

    def shutdown(self) -> None:
        _kill(self.grid)


def _check(config: dict[str, Any], max_seq_len: int, codec: str) -> None:
    """Deploy's arguments, before any actor starts (ConfigError naming the bad one)."""
    for key in ("optimizer", "lr_schedule", "lora", "wire", "stage_resources"):
        if config[key] is not None and not isinstance(config[key], dict):
            raise ConfigError(f"{key}={config[key]!r}: give a dict of options (or leave it out)")
    try:
        resolve_dtype(config["dtype"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"dtype={config['dtype']!r}: {e}") from None
    if config["schedule"] not in SCHEDULES:
        raise ConfigError(f"schedule {config['schedule']!r}: choose one of {SCHEDULES}")
    for key in ("micro_batches", "data_parallel", "num_stages"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{key}={config[key]!r}: give at least 1")
    if config["layers_per_stage"] is not None and config["layers_per_stage"] < 1:
        raise ConfigError(f"layers_per_stage={config['layers_per_stage']!r}: give at least 1")
    clip = config["grad_clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ConfigError(f"grad_clip={config['grad_clip']}: give a positive norm, or None for no clipping")
    if config["optimizer"].get("name", "adamw") not in OPTIMIZERS:
        raise ConfigError(f"optimizer {config['optimizer'].get('name')!r}: choose one of {sorted(OPTIMIZERS)}")
    try:  # torch's own checks (a negative lr, an unknown keyword), here rather than in every stage actor
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], config["optimizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"optimizer {config['optimizer']!r}: {e}") from None
    if config["balance"] not in ("even", "speed"):
        raise ConfigError(f"balance={config['balance']!r}: choose even or speed")
    seq_len = config["seq_len"]
    if seq_len is not None and not 1 < seq_len <= max_seq_len:
        raise ConfigError(f"seq_len={seq_len}: give 2..{max_seq_len} (the model's context)")
    if config["dtype"] == "float64" and codec not in LOSSLESS:
        raise ConfigError(f"wire codec {codec!r} is lossy: float64 training keeps its messages exact "
                          f"(codec auto or none; the codecs: {codec_names()})")
    sched = config["lr_schedule"]
    if sched is not None:
        unknown = set(sched) - {"name", "warmup", "total", "min_lr"}
        if unknown or sched.get("name", "constant") not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule {sched!r}: give name ({', '.join(LR_SCHEDULES)}), warmup, total, "
                              "min_lr")
        warmup, total, min_lr = sched.get("warmup", 0), sched.get("total", 0), sched.get("min_lr", 0.0)
        if not all(type(v) is int and v >= 0 for v in (warmup, total)) or \
                isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or not min_lr >= 0:
            raise ConfigError(f"lr_schedule {sched!r}: warmup and total are steps (ints >= 0), min_lr a rate >= 0")
        if sched.get("name", "constant") != "constant" and total <= warmup:
            raise ConfigError(f"lr_schedule {sched!r}: a {sched['name']} decay needs total > warmup")


def _kill(grid: list[list[Any]]) -> None:
    import ray

    for row in grid:
        for a in row:
            ray.kill(a)


def _tokens(micros: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return int(sum((t != -100).sum() for _, t in micros))


def _lost_peer(e: Exception) -> bool:
    """A task failed because a peer died (a collective lost its member, or an argument's owner died):
    by the cause's type where Ray and torch.distributed give one, else by gloo's plain RuntimeError text
    (a peer's socket closing mid-collective has no type of its own)."""
    import ray
    import torch.distributed as dist

    cause = getattr(e, "cause", None)
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, dist.DistError)):
        return True
    text = f"{e} {cause}"
    return any(s in text for s in ("RayActorError", "ActorDiedError", "Connection closed by peer",
                                   "Connection reset", "gloo", "NCCL", "ObjectLost", "OwnerDied"))
