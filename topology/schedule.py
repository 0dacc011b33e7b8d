"""Pipeline training schedules as pure plans (no Ray, no torch): which forward and backward each stage
runs, in order, for M micro-batches (torch.distributed.pipelining's GPipe and 1F1B).

A plan is one list of `Action`s per stage. The stage actors execute it; here it is checked for
completeness and order, its peak of micro-batches holding activations on each stage is counted
(1F1B keeps at most S - stage alive, GPipe all M), and `simulate` replays it with per-action times
to give the makespan and the bubble fraction, (S - 1) / (M + S - 1) for equal times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Action:
    kind: str  # "F": forward of a micro-batch, "B": its backward
    micro: int  # the micro-batch, 0..M-1

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro}"


def plan(schedule: str, num_stages: int, micro_batches: int) -> list[list[Action]]:
    """Per stage, the ordered actions of one training step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {SCHEDULES}")
    if num_stages < 1 or micro_batches < 1:
        raise ValueError(f"num_stages ({num_stages}) and micro_batches ({micro_batches}) must be at least 1")
    S, M = num_stages, micro_batches
    if schedule == "gpipe":  # every forward, then every backward
        return [[Action("F", m) for m in range(M)] + [Action("B", m) for m in range(M)] for _ in range(S)]
    out = []
    for s in range(S):  # 1F1B: warm up with S - 1 - s forwards, then one forward one backward, then drain
        warm = min(S - 1 - s, M)
        acts = [Action("F", m) for m in range(warm)]
        for i in range(M - warm):
            acts += [Action("F", warm + i), Action("B", i)]
        acts += [Action("B", m) for m in range(M - warm, M)]
        out.append(acts)
    return out


def check(actions: list[list[Action]], micro_batches: int) -> None:
    """ValueError unless every stage runs each micro-batch's forward once, then its backward once."""
    for s, acts in enumerate(actions):
        for kind in ("F", "B"):
            got = sorted(a.micro for a in acts if a.kind == kind)
            if got != list(range(micro_batches)):
                raise ValueError(f"stage {s}: {kind} of micro-batches {got}, expected each of 0..{micro_batches - 1}")
        done: set[int] = set()
        for a in acts:
            if a.kind == "F":
                done.add(a.micro)
            elif a.micro not in done:
                raise ValueError(f"stage {s}: B{a.micro} before F{a.micro}")


def peak_in_flight(acts: list[Action]) -> int:
    """The most micro-batches whose activations one stage holds at once (forward run, backward not yet)."""
    alive = peak = 0
    for a in acts:
        alive += 1 if a.kind == "F" else -1
        peak = max(peak, alive)
    return peak


def theoretical_bubble(num_stages: int, micro_batches: int) -> float:
    """The idle fraction of a pipeline step with equal action times: (S - 1) / (M + S - 1)."""
    return (num_stages - 1) / (micro_batches + num_stages - 1)


def submission_order(actions: list[list[Action]]) -> list[tuple[int, Action]]:
    """Every (stage, action), each after the action it waits on (F(m) on the stage before, B(m) on the
    stage after) and after its own stage's earlier actions; ValueError when the plan deadlocks."""
    S = len(actions)
    done: set[tuple[str, int, int]] = set()
    nxt, out = [0] * S, []
    total = sum(len(a) for a in actions)
    while len(out) < total:
        moved = False
        for s in range(S):
            if nxt[s] == len(actions[s]):
                continue
            a = actions[s][nxt[s]]
            first = (a.kind == "F" and s == 0) or (a.kind == "B" and s == S - 1)
            if first or _waits_on(a, s) in done:
                done.add((a.kind, a.micro, s))
                out.append((s, a))
                nxt[s] += 1
                moved = True
        if not moved:
            raise ValueError("the plan deadlocks: a stage waits for an action that never runs")
    return out


def _waits_on(a: Action, stage: int) -> tuple[str, int, int]:
    return ("F", a.micro, stage - 1) if a.kind == "F" else ("B", a.micro, stage + 1)


def simulate(actions: list[list[Action]], forward_s: float = 1.0, backward_s: float = 1.0) -> tuple[float, float]:
    """Replays a plan: F(m) on stage s waits for F(m) on s - 1, B(m) for B(m) on s + 1 (and the last
    stage's B(m) for its F(m)); each stage runs its actions in order. Returns (makespan, bubble
    fraction = 1 - busy / (stages x makespan))."""
    S = len(actions)
    end: dict[tuple[str, int, int], float] = {}  # (kind, micro, stage) -> finish time
    clock = [0.0] * S
    for s, a in submission_order(actions):
        if a.kind == "F":
            ready = 0.0 if s == 0 else end[_waits_on(a, s)]
        else:
            ready = end[("F", a.micro, s)] if s == S - 1 else end[_waits_on(a, s)]
        clock[s] = end[(a.kind, a.micro, s)] = max(clock[s], ready) + (forward_s if a.kind == "F" else backward_s)
    makespan = max(clock)
    busy = sum(forward_s if a.kind == "F" else backward_s for acts in actions for a in acts)
    return makespan, 1.0 - busy / (S * makespan)


def deal(micro_batches: int, speeds: list[float]) -> list[int]:
    """How many of `micro_batches` each data-parallel copy runs: in proportion to its speed (largest
    remainder; equal speeds deal evenly, earlier copies take the remainder), every copy at least one
    while there are enough."""
    if not speeds or any(not (v > 0 and math.isfinite(v)) for v in speeds):  # inf: inf / inf is NaN below
        raise ValueError(f"speeds must be positive and finite, got {speeds}")
    if micro_batches < 0:  # a negative count was dealt out as negative shares
        raise ValueError(f"micro_batches={micro_batches!r} must be >= 0")
    D = len(speeds)
    floor = 1 if micro_batches >= D else 0
    rest = micro_batches - floor * D
    share = [rest * v / sum(speeds) for v in speeds]
    counts = [int(x) for x in share]
    order = sorted(range(D), key=lambda d: (-(share[d] - counts[d]), d))
    for d in order[:rest - sum(counts)]:
        counts[d] += 1
    return [floor + c for c in counts]


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, base_lr: float, name: str = "constant", warmup: int = 0, total: int = 0,
          min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup over `warmup` steps, then
    constant, or a linear / cosine decay to `min_lr` at step `total`."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {name!r}: choose one of {LR_SCHEDULES}")
    if warmup and step <= warmup:
        return base_lr * step / warmup
    if name == "constant" or total <= warmup:
        return base_lr
    frac = min(1.0, (step - warmup) / (total - warmup))
    decay = 1 - frac if name == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return min_lr + (base_lr - min_lr) * decay
