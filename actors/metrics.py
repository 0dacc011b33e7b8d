"""meshpipe's metrics, through `ray.util.metrics`: Ray exports them as `ray_meshpipe_*` to Prometheus
and the dashboard's metrics view. All are tagged by deployment; stage ones also by stage and replica.

One object per actor kind creates its metrics once (Ray registers them per process); the actors
call the small `record_*` helpers, never the Ray classes directly.
"""

from __future__ import annotations

import time
from typing import Any

REFRESH_S = 1.0  # a stage's gauges and byte counter are set at most this often by its steps
_STEP_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
_SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60]


class RouterMetrics:
    def __init__(self, deployment: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"deployment": deployment}
        keys = ("deployment",)
        replica_keys = ("deployment", "stage", "replica")
        self.tokens = Counter("meshpipe_tokens_generated", "tokens generated", tag_keys=keys)
        self.requests = Counter("meshpipe_requests", "requests finished, by outcome",
                                tag_keys=("deployment", "outcome"))
        self.active = Gauge("meshpipe_active_sequences", "sequences decoding now", tag_keys=keys)
        self.queued = Gauge("meshpipe_queued_requests", "admitted requests waiting for a slot", tag_keys=keys)
        self.retransmits = Counter("meshpipe_retransmits", "messages resent after a checksum failure or loss",
                                   tag_keys=keys)
        self.reroutes = Counter("meshpipe_reroutes", "sequences moved to another replica after a failure",
                                tag_keys=keys)
        self.ring_breaks = Counter("meshpipe_ring_breaks", "decode rings broken, by cause (their sequences go on "
                                   "through Ray calls)", tag_keys=("deployment", "cause"))
        self.recovery = Histogram("meshpipe_recovery_seconds", "failed step to step redone",
                                  boundaries=_SECONDS, tag_keys=keys)
        self.queue = Gauge("meshpipe_stage_queue_length", "messages sent to a replica and not answered",
                           tag_keys=replica_keys)
        self.hop_ms = Histogram("meshpipe_hop_latency_ms", "a message's wait between its send and its start",
                                boundaries=_STEP_MS, tag_keys=replica_keys)
        self.spec = {"passes": 0, "drafted": 0, "accepted": 0}  # speculative decoding totals, for stats
        self.spec_counters = {k: Counter(f"meshpipe_speculative_{k}", f"speculative decoding: {k}", tag_keys=keys)
                              for k in self.spec}
        self.prefix = {"prompt_tokens": 0, "hit_tokens": 0}  # prompt tokens started, and those cached blocks held
        self.prefix_counters = {k: Counter(f"meshpipe_prefix_{k}", f"prefix caching: {k.replace('_', ' ')}",
                                           tag_keys=keys) for k in self.prefix}
        self.efficiency = Gauge("meshpipe_pipeline_efficiency",
                                "mean busy fraction of the stages' replicas (1 = no bubbles)", tag_keys=keys)

    def step(self, tokens: int, trace: list[tuple[int, int, float, float]], retransmits: int) -> None:
        """Per step (or a ring's report): tokens out, retransmits, each hop's wait (gauges are set once a second
        by `load`)."""
        if tokens:  # Ray's counters refuse an increment of 0
            self.tokens.inc(tokens, self.tags)
        if retransmits:
            self.retransmits.inc(retransmits, self.tags)
        for stage, replica, inbound_ms, _ in trace:
            self.hop_ms.observe(inbound_ms, {**self.tags, "stage": str(stage), "replica": str(replica)})

    def speculated(self, drafted: int, accepted: int) -> None:
        """One verification pass of a speculative sequence: drafts sent, drafts accepted."""
        for k, v in (("passes", 1), ("drafted", drafted), ("accepted", accepted)):
            self.spec[k] += v
            if v:
                self.spec_counters[k].inc(v, self.tags)

    def speculation(self) -> dict[str, float]:
        """Totals and tokens a pass (accepted drafts + the one sampled token, per pass)."""
        p = self.spec["passes"]
        return {**self.spec, "tokens_per_pass": round((self.spec["accepted"] + p) / p, 3) if p else 0.0}

    def prompted(self, prompt_tokens: int = 0, hit_tokens: int = 0) -> None:
        """A sequence started with `prompt_tokens` to prefill, `hit_tokens` of them found cached."""
        for k, v in (("prompt_tokens", prompt_tokens), ("hit_tokens", hit_tokens)):
            self.prefix[k] += v
            if v:
                self.prefix_counters[k].inc(v, self.tags)

    def prefix_stats(self) -> dict[str, float]:
        """Prompt tokens started, hit (no stage computed them), and the hit rate."""
        return {**self.prefix, "hit_rate": round(self.prefix["hit_tokens"] / max(1, self.prefix["prompt_tokens"]), 4)}

    def load(self, active: int, queued: int) -> None:
        self.active.set(active, self.tags)
        self.queued.set(queued, self.tags)

    def queues(self, lengths: dict[tuple[int, int], int]) -> None:
        for (stage, replica), n in lengths.items():
            self.queue.set(n, {**self.tags, "stage": str(stage), "replica": str(replica)})

    def finished(self, outcome: str) -> None:
        self.requests.inc(1, {**self.tags, "outcome": outcome})

    def recovered(self, seconds: float) -> None:
        self.recovery.observe(seconds, self.tags)

    def rerouted(self, sequences: int) -> None:
        self.reroutes.inc(sequences, self.tags)

    def ring_broken(self, cause: str) -> None:
        self.ring_breaks.inc(1, {**self.tags, "cause": cause})


class StageMetrics:
    def __init__(self, deployment: str, stage: int, replica: int) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"deployment": deployment, "stage": str(stage), "replica": str(replica)}
        keys = tuple(self.tags)
        self.step_ms = Histogram("meshpipe_stage_step_latency_ms", "a stage step's compute time",
                                 boundaries=_STEP_MS, tag_keys=keys)
        self.bytes = Counter("meshpipe_hop_bytes", "bytes a stage sent on (encoded messages)", tag_keys=keys)
        self.ratio = Gauge("meshpipe_codec_ratio", "raw / encoded size of the last message sent", tag_keys=keys)
        self.restarts = Gauge("meshpipe_stage_restarts", "Ray restarts of this replica", tag_keys=keys)
        self.sequences = Gauge("meshpipe_stage_sequences", "sequences whose KV cache this replica holds",
                               tag_keys=keys)
        self.kv_used = Gauge("meshpipe_kv_blocks_used", "KV cache blocks held by sequences", tag_keys=keys)
        self.kv_free = Gauge("meshpipe_kv_blocks_free", "KV cache blocks free or cached for reuse", tag_keys=keys)

        self.last_ratio: float | None = None
        self.restart_count = 0
        self.unsent_bytes = 0  # bytes sent since the counter was last bumped
        self.refreshed = 0.0  # time.monotonic() of the last refresh

    def step(self, ms: float, sent: Any, raw_bytes: int, sequences: int) -> None:
        """Per step: its time (a histogram wants every value); the byte counter and the gauges at most
        once a second (each Ray metric call costs ~4 us, a decode ring's turn a few hundred)."""
        self.step_ms.observe(ms, self.tags)
        if sent is not None and len(sent):
            self.unsent_bytes += len(sent)
            self.last_ratio = raw_bytes / len(sent)
        if time.monotonic() - self.refreshed >= REFRESH_S:
            self.refresh(sequences)

    def refresh(self, sequences: int, blocks: tuple[int, int] | None = None) -> None:
        """Sets the gauges again (Ray exports a gauge's value for the period it was set in) and adds the
        bytes sent since the last refresh. `blocks`: (used, free) KV blocks."""
        self.refreshed = time.monotonic()
        if self.unsent_bytes:
            self.bytes.inc(self.unsent_bytes, self.tags)
            self.unsent_bytes = 0
        self.sequences.set(sequences, self.tags)
        if blocks is not None:
            self.kv_used.set(blocks[0], self.tags)
            self.kv_free.set(blocks[1], self.tags)
        self.restarts.set(self.restart_count, self.tags)
        if self.last_ratio is not None:
            self.ratio.set(self.last_ratio, self.tags)


class AutoscalerMetrics:
    def __init__(self, deployment: str) -> None:
        from ray.util.metrics import Counter

        self.tags = {"deployment": deployment}
        self.decisions = Counter("meshpipe_autoscaler_decisions", "replicas added (up) or removed (down)",
                                 tag_keys=("deployment", "stage", "direction"))

    def decided(self, stage: int, delta: int) -> None:
        self.decisions.inc(1, {**self.tags, "stage": str(stage), "direction": "up" if delta > 0 else "down"})


class TrainMetrics:
    """A training stage's metrics (tagged by deployment, stage and data-parallel copy)."""

    def __init__(self, deployment: str, stage: int, copy: int) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"deployment": deployment, "stage": str(stage), "copy": str(copy)}
        keys = ("deployment", "stage", "copy")
        self.loss = Gauge("meshpipe_train_loss", "the last step's global mean loss", tag_keys=keys)
        self.tokens = Counter("meshpipe_train_tokens", "target tokens trained on (each copy its share)",
                              tag_keys=keys)
        self.seconds = Histogram("meshpipe_train_step_seconds", "an optimizer step's wall time",
                                 boundaries=_SECONDS, tag_keys=keys)
        self.bubble = Gauge("meshpipe_train_bubble_fraction", "the last step's idle fraction of the stages",
                            tag_keys=keys)

    def step(self, loss: float, tokens: int, seconds: float, bubble: float) -> None:
        self.loss.set(loss, self.tags)
        if tokens:
            self.tokens.inc(tokens, self.tags)
        self.seconds.observe(seconds, self.tags)
        self.bubble.set(bubble, self.tags)
