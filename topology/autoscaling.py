"""The autoscaling policy: a pure function from per-stage load to a decision (Ray Serve's pattern).

Every period the autoscaler actor reads each stage's load (busy fraction, queue, step time) and
calls `decide`. The policy finds the bottleneck stage, adds a replica there when its load stays
above target for `upscale_delay_s`, and removes one from a stage whose load would stay below
`downscale_below` × target even with one replica fewer, for `downscale_delay_s`. The band
between the two thresholds and the delays (timers reset by every decision) keep it from flapping.
No Ray here; unit-tested with synthetic load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalingConfig(BaseModel):
    """User options (`Pipeline.deploy(..., autoscaling={...})`), validated at the edge."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)  # per stage
    max_replicas: int = Field(4, ge=1)  # per stage
    target_busy: float = Field(0.7, gt=0, lt=1)  # busy fraction per replica the policy aims at (1 is never exceeded)
    downscale_below: float = Field(0.6, gt=0, lt=1)  # remove only if the load would stay below this x target
    upscale_delay_s: float = Field(2.0, ge=0)  # load above target this long before adding a replica
    downscale_delay_s: float = Field(10.0, ge=0)  # load low this long before removing one
    period_s: float = Field(0.5, gt=0)  # how often the autoscaler looks
    max_queue: float = Field(2.0, ge=0)  # messages waiting per replica that also count as overload
    add_timeout_s: float = Field(600.0, gt=0)  # a new replica not ready by then (no GPU, no node came) is given up

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


@dataclass
class StageLoad:
    """What the stage replicas report, averaged over the stage's live replicas."""

    stage: int
    replicas: int  # live replicas now (draining ones excluded)
    busy: float  # fraction of the last period spent computing, mean over replicas (0..1)
    queue: float = 0.0  # messages waiting per replica
    step_ms: float = 0.0  # moving average of a step


@dataclass
class Decision:
    stage: int  # the stage to change
    delta: int  # +1: add a replica; -1: drain and remove one
    reason: str  # for logs and the decisions metric


@dataclass
class PolicyState:
    """The policy's memory between calls: since when each stage has been over / under target."""

    over_since: dict[int, float] = field(default_factory=dict)
    under_since: dict[int, float] = field(default_factory=dict)


def pressure(load: StageLoad, cfg: AutoscalingConfig) -> float:
    """Load relative to target: > 1 is overloaded. A queue beyond `max_queue` counts as full busy."""
    queued = load.queue / cfg.max_queue if cfg.max_queue else 0.0
    return max(load.busy, min(1.0, queued)) / cfg.target_busy


def desired_replicas(load: StageLoad, cfg: AutoscalingConfig) -> int:
    """Replicas that would bring the stage to its target busy fraction, within bounds."""
    want = math.ceil(load.replicas * pressure(load, cfg) - 1e-9)
    return max(cfg.min_replicas, min(cfg.max_replicas, max(1, want)))


def decide(loads: Sequence[StageLoad], cfg: AutoscalingConfig, state: PolicyState, now: float) -> list[Decision]:
    """Any downscales that are due, then at most one upscale (the bottleneck stage); updates `state`.

    Removals come first: a replica that goes frees the GPU an added one may wait for. A stage whose
    figures are not finite is left as it is (no decision either way) until they are."""
    decisions: list[Decision] = []
    unknown = {ld.stage for ld in loads if not (math.isfinite(ld.busy) and math.isfinite(ld.queue))}
    for stage in unknown:
        state.over_since.pop(stage, None)
        state.under_since.pop(stage, None)
    every, loads = loads, [ld for ld in loads if ld.stage not in unknown]
    over = [ld for ld in loads if pressure(ld, cfg) > 1.0 and ld.replicas < cfg.max_replicas]
    for ld in loads:
        if ld not in over:
            state.over_since.pop(ld.stage, None)
        # would one replica fewer still be comfortably under target?
        after = pressure(ld, cfg) * ld.replicas / (ld.replicas - 1) if ld.replicas > 1 else math.inf
        if ld.replicas > cfg.min_replicas and after < cfg.downscale_below:
            state.under_since.setdefault(ld.stage, now)
        else:
            state.under_since.pop(ld.stage, None)
    for ld in over:
        state.over_since.setdefault(ld.stage, now)
    for ld in loads:
        since = state.under_since.get(ld.stage)
        if since is not None and now - since >= cfg.downscale_delay_s and ld.replicas > cfg.min_replicas:
            decisions.append(Decision(ld.stage, -1, f"stage {ld.stage} at {pressure(ld, cfg):.2f}x target with "
                                                    f"{ld.replicas} replicas for {now - since:.1f} s"))
            state.under_since.pop(ld.stage)
    due = [ld for ld in over if now - state.over_since[ld.stage] >= cfg.upscale_delay_s]
    if due:
        top = max(due, key=lambda ld: (pressure(ld, cfg), -ld.stage))  # the bottleneck
        decisions.append(Decision(top.stage, +1, f"stage {top.stage} at {pressure(top, cfg):.2f}x target for "
                                                 f"{now - state.over_since[top.stage]:.1f} s"))
        state.over_since.pop(top.stage)  # the new replica must show its effect before the next one
    for ld in every:  # bounds changed under us (config, or replicas lost): back inside them first
        if ld.replicas < cfg.min_replicas and not any(d.stage == ld.stage for d in decisions):
            decisions.append(Decision(ld.stage, +1, f"stage {ld.stage} below min_replicas={cfg.min_replicas}"))
    return decisions
