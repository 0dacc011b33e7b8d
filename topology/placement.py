"""Layer placement over heterogeneous GPUs: contiguous layer ranges, one stage per GPU.

`place(model, gpus)` assigns each pipeline stage a contiguous range of decoder layers and one GPU so
that the slowest stage is as fast as possible, every stage fitting in its GPU's memory. It uses
`topology.split`'s cost model (`StageCostModel`, plain per-layer numbers): one unit of compute a
decoder layer, `head_cost`
for the LM head on the last stage, the embedding lookup free in compute but its table held by the
first stage. A stage's time is its compute divided by its GPU's speed.

Objective, lexicographic: (1) the slowest stage's time (the pipeline's throughput); (2) the total
time of all stages (one token's latency through it); (3) host changes between consecutive stages;
(4) fewer stages. (1) and (2) are exact; (3) and (4) are best effort (see the mapping below).

Algorithm. GPUs with the same (memory, speed) are interchangeable, so they
are grouped into TYPES; a partial placement is the state (layers placed so far, count used of each
type). With T types of counts C_t there are prod(C_t + 1) count vectors: few for realistic clusters.
- The optimal slowest time M* is one of the finitely many values cost(range) / speed; it is found by
  binary search over them with a feasibility test per candidate M. For a fixed M, the farthest
  layer reachable with a given multiset of non-final stages is a DP over count vectors only (taking
  each stage as long as M and memory allow dominates: the reachable positions are an interval, and
  a later start only helps the stages after it).
- Then the total time is minimised among placements whose every stage takes at most M*: a DP over
  the states (count vector, layers placed), pruned by a backward bound (the earliest layer from
  which the GPUs still unused can finish the model within M*).
- A single GPU type (the total is then the same for every placement) reduces to
  `topology.split.min_max_cuts`, the same cuts as `split`, for the fewest stages reaching M*.
Middle stages (neither first nor last) take the same time and memory wherever they sit, so they are
reordered to group stages of the same GPU type: fewer type changes, fewer host changes.

Mapping types to concrete GPUs (a heuristic for objective (3)): walk the stages in order; stay on
the current host while it has a free GPU of the type the stage needs; otherwise move to the host
that can serve the longest run of the following stages with its free GPUs (ties: the host left with
the fewest free GPUs after that run, so big hosts stay whole, then the host listed first). Among the
placements tied on (1) and (2) (one per final count vector and last GPU type), the `_MAX_TIED` with
the fewest stages and GPU types are mapped and the one with the fewest host changes is kept.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from topology.errors import SplitError
from topology.graph import Topology
from topology.split import StageCostModel, StageSpec, min_max_cuts

log = logging.getLogger(__name__)

GIB = 2**30  # `gpu_memory_gb` in topology files is read as GiB (2**30 bytes)
_MAX_TIED = 32  # placements tied on the slowest and total time that are mapped to hosts and compared
_REL_TOL = 1e-9  # final totals within this relative difference count as tied
_DP_TOL = 1e-12  # a DP entry is replaced only by a total smaller by more than this (relative)


@dataclass(frozen=True)
class Gpu:
    host: str  # topology node id
    index: int  # GPU index on that host (0..gpus-1)
    memory_bytes: float  # usable memory for weights (+ KV headroom handled by the caller); inf: unlimited
    speed: float  # relative compute speed (e.g. TFLOPS); stage time = work / speed

    def __post_init__(self) -> None:
        where = f"of GPU {self.host}:{self.index}"
        if not isinstance(self.index, int) or self.index < 0:
            raise SplitError(f"index={self.index!r} {where} must be a non-negative integer")
        if not self.memory_bytes >= 0:  # also rejects NaN
            raise SplitError(f"memory_bytes={self.memory_bytes!r} {where} must be >= 0 (inf: unlimited)")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise SplitError(f"speed={self.speed!r} {where} must be positive and finite")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.index}"


@dataclass(frozen=True)
class StagePlacement:
    stage: StageSpec  # the layers it owns (index, layers, embed, head)
    gpu: Gpu  # where it runs
    time: float  # compute / speed of this stage (units: layer-equivalents / speed)
    memory_bytes: float  # weights it holds (KV headroom not included)


def gpus_from_topology(topo: Topology, reserve_fraction: float = 0.1) -> list[Gpu]:
    """The GPUs of every topology node, in node order.

    Memory is `gpu_memory_gb` GiB (2**30 bytes) less `reserve_fraction` of it (activations, the CUDA
    context); 0 or missing means unlimited (inf). Speed is `tflops`; 0 or missing means 1.0.
    """
    if not 0 <= reserve_fraction < 1:
        raise SplitError(f"reserve_fraction={reserve_fraction!r} must be in [0, 1)")
    gpus: list[Gpu] = []
    for host, attrs in topo.graph.nodes(data=True):
        gb = attrs.get("gpu_memory_gb") or 0.0
        tflops = attrs.get("tflops") or 0.0
        memory = gb * GIB * (1 - reserve_fraction) if gb > 0 else math.inf
        speed = float(tflops) if tflops > 0 else 1.0
        gpus.extend(Gpu(host=str(host), index=i, memory_bytes=memory, speed=speed)
                    for i in range(int(attrs.get("gpus") or 0)))
    return gpus


def place(weights: StageCostModel, gpus: Sequence[Gpu], num_stages: int | None = None,
          kv_bytes_per_layer: float = 0.0, *, max_states: int = 200_000) -> list[StagePlacement]:
    """Contiguous layer ranges on distinct GPUs minimising the slowest stage, within memory.

    `num_stages`: None uses any number of the GPUs (1 to min(len(gpus), layers)); an int uses exactly
    that many. `kv_bytes_per_layer` is KV-cache headroom each owned layer needs beside its weights.
    `max_states` bounds the search (count vectors of GPU types, prod(count_t + 1)).
    `weights` costs the layers (weights only). Raises SplitError when the inputs are invalid or
    nothing fits (the message gives the numbers).
    """
    n = weights.n_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # else an IndexError on no candidates
        raise SplitError(f"n_layers={n!r} of the cost model must be a positive integer: a model has layers")
    gpus = list(gpus)
    if not gpus:
        raise SplitError("gpus is empty: give at least one GPU to place the model's layers on")
    seen: dict[tuple[str, int], int] = {}
    for i, g in enumerate(gpus):
        if not isinstance(g, Gpu):
            raise SplitError(f"gpus[{i}]={g!r} is not a Gpu")
        if (g.host, g.index) in seen:
            raise SplitError(f"gpus[{i}] ({g.label}) duplicates gpus[{seen[g.host, g.index]}]")
        seen[g.host, g.index] = i
    if num_stages is not None:
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise SplitError(f"num_stages={num_stages!r} must be a positive integer or None")
        if num_stages > n:
            raise SplitError(f"num_stages={num_stages} is more stages than the model's {n} layers")
        if num_stages > len(gpus):
            raise SplitError(f"num_stages={num_stages} is more stages than the {len(gpus)} GPUs given")
    if not (kv_bytes_per_layer >= 0 and math.isfinite(kv_bytes_per_layer)):
        raise SplitError(f"kv_bytes_per_layer={kv_bytes_per_layer!r} must be >= 0 and finite")

    model = weights.with_headroom(kv_bytes_per_layer)  # memory checks include headroom
    k_lo, k_hi = (num_stages, num_stages) if num_stages else (1, min(n, len(gpus)))
    search = _Search(model, gpus, k_lo, k_hi, max_states)
    best = search.min_slowest()
    if best is None:
        raise _nothing_fits(model, gpus, num_stages, kv_bytes_per_layer)
    if len(search.types) == 1:
        stages = search.single_type(best)
        chosen = _assign_gpus([t for _, _, t in stages], search.types, gpus)
    else:
        stages, chosen = search.min_total(best)

    last = len(stages) - 1
    result = [
        StagePlacement(stage=StageSpec(index=s, layers=tuple(range(i, j)), embed=s == 0, head=s == last),
                       gpu=gpu, time=model.cost(i, j) / gpu.speed, memory_bytes=weights.memory(i, j))
        for s, ((i, j, _), gpu) in enumerate(zip(stages, chosen))
    ]
    log.info("placement: %d layers on %d of %d GPUs (%d types), slowest stage %.4g, %d host changes: %s",
             n, len(result), len(gpus), len(search.types), max(p.time for p in result),
             _host_changes(chosen),
             " | ".join(f"{p.stage.layers[0]}-{p.stage.layers[-1]}@{p.gpu.label}" for p in result))
    return result


@dataclass(frozen=True)
class _GpuType:
    memory_bytes: float  # usable memory of each GPU of this type
    speed: float  # speed of each GPU of this type
    count: int  # GPUs of this type


class _Search:
    """The DPs over (count vector of GPU types, layers placed) for one model and GPU set."""

    def __init__(self, model: StageCostModel, gpus: list[Gpu], k_lo: int, k_hi: int,
                 max_states: int) -> None:
        groups: dict[tuple[float, float], int] = {}
        for g in gpus:
            groups[g.memory_bytes, g.speed] = groups.get((g.memory_bytes, g.speed), 0) + 1
        # fastest (then largest) type first: ties in the DPs go to the earlier type
        order = sorted(groups.items(), key=lambda kv: (-kv[0][1], -kv[0][0]))
        self.types = [_GpuType(memory, speed, count) for (memory, speed), count in order]
        self.model, self.gpus, self.n, self.k_lo, self.k_hi = model, gpus, model.n_layers, k_lo, k_hi
        self.num_states = math.prod(t.count + 1 for t in self.types)
        if self.num_states > max_states:
            raise SplitError(
                f"{len(gpus)} GPUs fall into {len(self.types)} (memory, speed) types, {self.num_states} "
                f"type count vectors > max_states={max_states}: round GPU memory and speed so that "
                "fewer types remain")
        # count vectors in mixed radix: index = sum(count_t * stride_t); c - e_t comes before c
        self.strides = [math.prod(t.count + 1 for t in self.types[i + 1:]) for i in range(len(self.types))]
        self.counts = list(itertools.product(*(range(t.count + 1) for t in self.types)))
        self.sizes = [sum(c) for c in self.counts]
        self.full = self.num_states - 1  # every GPU used

    def time(self, i: int, j: int, t: int) -> float:
        """Compute of layers [i, j) / speed of type t: the one expression every comparison uses."""
        return self.model.cost(i, j) / self.types[t].speed

    def _fits(self, i: int, j: int, t: int, limit: float) -> bool:
        return self.time(i, j, t) <= limit and self.model.memory(i, j) <= self.types[t].memory_bytes

    def _limits(self, limit: float) -> tuple[list[int], list[int], list[int]]:
        """Per type, for stages no slower than `limit`: the most layers of a middle stage, the
        farthest end of a first (non-last) stage (0: none), the earliest start of the last stage (n: none)."""
        n = self.n
        width, first_end, last_start = [], [], []
        for t in range(len(self.types)):
            w = 0
            while w + 1 <= n - 2 and self._fits(1, w + 2, t, limit):
                w += 1
            j = 0
            while j + 1 <= n - 1 and self._fits(0, j + 1, t, limit):
                j += 1
            q = n
            while q - 1 >= 0 and self._fits(q - 1, n, t, limit):
                q -= 1
            width.append(w)
            first_end.append(j)
            last_start.append(q)
        return width, first_end, last_start

    def _feasible(self, limit: float, k_lo: int, k_hi: int) -> bool:
        """Whether k_lo..k_hi stages, each no slower than `limit`, can hold the model."""
        n, types, strides, counts, sizes = self.n, self.types, self.strides, self.counts, self.sizes
        width, first_end, last_start = self._limits(limit)
        # The non-final stages of count vector c (m stages) can end exactly at the layers [m, reach[c]]
        # (an interval; -1: none): one more stage on type t turns [m - 1, R] into [m, min(R + width, n - 1)].
        reach = [-1] * self.num_states
        reach[0] = 0
        for idx in range(1, self.num_states):
            m = sizes[idx]
            if m > k_hi - 1:
                continue
            c, best = counts[idx], -1
            for t in range(len(types)):
                if c[t] == 0:
                    continue
                prev = reach[idx - strides[t]]
                if prev < 0:
                    continue
                end = first_end[t] if prev == 0 else (min(prev + width[t], n - 1) if width[t] else -1)
                if end >= m and end > best:
                    best = end
            reach[idx] = best
        for idx in range(self.num_states):
            p = reach[idx]
            if p < 0 or not k_lo - 1 <= sizes[idx] <= k_hi - 1:
                continue
            if any(counts[idx][t] < types[t].count and p >= last_start[t] for t in range(len(types))):
                return True
        return False

    def min_slowest(self) -> float | None:
        """The optimal slowest-stage time (None when nothing fits), by binary search over candidates."""
        n, m = self.n, self.model
        candidates = sorted({m.cost(0, w) / t.speed for t in self.types for w in range(1, n)}
                            | {m.cost(n - w, n) / t.speed for t in self.types for w in range(1, n + 1)})
        if not self._feasible(candidates[-1], self.k_lo, self.k_hi):
            return None
        lo, hi = 0, len(candidates) - 1  # candidates[hi] is feasible
        while lo < hi:
            mid = (lo + hi) // 2
            if self._feasible(candidates[mid], self.k_lo, self.k_hi):
                hi = mid
            else:
                lo = mid + 1
        return candidates[hi]

    def single_type(self, limit: float) -> list[tuple[int, int, int]]:
        """One GPU type: `partition`'s cuts for the fewest stages whose slowest is `limit`."""
        k = next(k for k in range(self.k_lo, self.k_hi + 1) if self._feasible(limit, k, k))
        _, cuts = min_max_cuts(self.model, k, self.types[0].memory_bytes)
        bounds = [0, *cuts]
        return [(bounds[s], bounds[s + 1], 0) for s in range(k)]

    def _earliest_finish(self, limit: float) -> list[int]:
        """Per count vector r: the earliest layer from which at most r's GPUs can finish the model
        with every stage within `limit` (taking each stage as long as it can: an earlier start only helps)."""
        n, strides, counts = self.n, self.strides, self.counts
        width, first_end, last_start = self._limits(limit)

        def back(j: int, t: int) -> int:  # earliest start of a stage on type t ending at j (j: none)
            if j == n:
                return last_start[t]
            if j <= first_end[t]:
                return 0
            return max(1, j - width[t]) if width[t] else j

        earliest = [n] * self.num_states
        for idx in range(1, self.num_states):
            best = n
            for t, ct in enumerate(counts[idx]):
                if ct:
                    prev = earliest[idx - strides[t]]
                    best = min(best, prev, back(prev, t))
            earliest[idx] = best
        return earliest

    def min_total(self, limit: float) -> tuple[list[tuple[int, int, int]], list[Gpu]]:
        """Stages (start, end, type) with every stage within `limit`, minimising the total time;
        among ties, the fewest host changes once mapped to GPUs, then the fewest stages."""
        n, types, strides, counts, sizes = self.n, self.types, self.strides, self.counts, self.sizes
        width, first_end, last_start = self._limits(limit)
        earliest = self._earliest_finish(limit)
        inf = math.inf
        # time of a non-final stage of w layers on type t: the same value as self.time(p, p + w, t)
        step = [[self.time(0, w, t) for w in range(n)] for t in range(len(types))]
        # count vector of the non-final stages -> layers placed -> min total time, and how it was reached
        total: dict[int, list[float]] = {0: [0.0] + [inf] * (n - 1)}
        parent: dict[int, list[tuple[int, int] | None]] = {0: [None] * n}  # (previous layers placed, type)
        finals: list[tuple[float, int, int, int]] = []  # (total, count vector, layers placed, last type)
        for idx in range(self.num_states):
            row = total.get(idx)
            if row is None:
                continue
            c, m, rem = counts[idx], sizes[idx], self.full - idx
            free = [t for t in range(len(types)) if c[t] < types[t].count]
            can_end = self.k_lo - 1 <= m <= self.k_hi - 1  # the next stage may be the last
            # the next stage may be a non-final one (a GPU stays for the last): (type, its targets)
            nexts = [] if m + 1 > self.k_hi - 1 else [
                (t, idx + strides[t], earliest[rem - strides[t]]) for t in free if rem - strides[t]]
            max_end = n - max(1, self.k_lo - m - 1)  # one layer for each stage still needed
            for p, base in enumerate(row):
                if base == inf or (idx and p < earliest[rem]):
                    continue
                if can_end:
                    finals.extend((base + self.time(p, n, t), idx, p, t) for t in free if p >= last_start[t])
                for t, nidx, finish in nexts:
                    hi = min(first_end[t] if p == 0 else p + width[t], max_end)
                    lo = max(p + 1, finish)
                    if lo > hi:
                        continue
                    if nidx not in total:
                        total[nidx], parent[nidx] = [inf] * n, [None] * n
                    nrow, npar, times = total[nidx], parent[nidx], step[t]
                    for j in range(lo, hi + 1):
                        val = base + times[j - p]
                        if val < nrow[j] - _DP_TOL * val:
                            nrow[j], npar[j] = val, (p, t)
        best_total = min(f[0] for f in finals)
        tied = sorted((f for f in finals if f[0] <= best_total + _REL_TOL * max(1.0, best_total)),
                      key=lambda f: (sizes[f[1]], sum(1 for x in counts[f[1]] if x), f[0]))
        options = []
        for tot, idx, p, t in tied[:_MAX_TIED]:
            stages = [(p, n, t)]
            while idx:
                pp, tt = parent[idx][p]  # type: ignore[misc]
                stages.append((pp, p, tt))
                idx, p = idx - strides[tt], pp
            stages = _group_middle(stages[::-1])
            chosen = _assign_gpus([s[2] for s in stages], types, self.gpus)
            options.append(((_host_changes(chosen), len(stages), tot), stages, chosen))
        _, stages, chosen = min(options, key=lambda o: o[0])
        return stages, chosen


def _group_middle(stages: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Reorder the middle stages (same time and memory anywhere) so stages of one type sit together:
    the first stage's type right after it, the last stage's type right before it, others between."""
    if len(stages) < 4:
        return stages
    first_t, last_t = stages[0][2], stages[-1][2]
    middle = sorted(stages[1:-1], key=lambda s: (0 if s[2] == first_t else 2 if s[2] == last_t else 1, s[2]))
    out, start = [stages[0]], stages[0][1]
    for i, j, t in middle:
        out.append((start, start + j - i, t))
        start += j - i
    out.append(stages[-1])
    return out


def _assign_gpus(stage_types: list[int], types: list[_GpuType], gpus: list[Gpu]) -> list[Gpu]:
    """Concrete GPUs for a sequence of stage types, keeping consecutive stages on one host when it can
    (the heuristic in the module docstring)."""
    type_of = {(t.memory_bytes, t.speed): i for i, t in enumerate(types)}
    free: dict[str, dict[int, list[Gpu]]] = {}
    for g in sorted(gpus, key=lambda g: g.index):
        if g.host not in free:
            free[g.host] = {}
        free[g.host].setdefault(type_of[g.memory_bytes, g.speed], []).append(g)
    hosts = list(dict.fromkeys(g.host for g in gpus))  # topology order
    chosen: list[Gpu] = []
    current: str | None = None
    for s, t in enumerate(stage_types):
        if current is None or not free[current].get(t):
            best: tuple[tuple[int, int, int], str] | None = None
            for rank, h in enumerate(hosts):
                if not free[h].get(t):
                    continue
                left = {tt: len(v) for tt, v in free[h].items()}
                run = 0
                for tt in stage_types[s:]:
                    if not left.get(tt):
                        break
                    left[tt] -= 1
                    run += 1
                key = (-run, sum(left.values()), rank)
                if best is None or key < best[0]:
                    best = (key, h)
            assert best is not None, "the DP used more GPUs of a type than exist"
            current = best[1]
        chosen.append(free[current][t].pop(0))
    return chosen


def _host_changes(chosen: Sequence[Gpu]) -> int:
    return sum(a.host != b.host for a, b in zip(chosen, chosen[1:]))


def _nothing_fits(model: StageCostModel, gpus: list[Gpu], num_stages: int | None,
                  kv_bytes_per_layer: float) -> SplitError:
    n = model.n_layers

    def fmt(x: float) -> str:
        return f"{x / GIB:.2f} GiB ({x:.4g} bytes)"

    biggest = max(g.memory_bytes for g in gpus)
    if n == 1:
        smallest = f"the one stage needs {fmt(model.memory(0, 1))}"
    else:
        first, last = model.memory(0, 1), model.memory(n - 1, n)
        smallest = (f"the smallest stage needs {fmt(min(first, last))} (a first stage: embedding + 1 layer "
                    f"= {fmt(first)}; a last stage: 1 layer + LM head = {fmt(last)}; each layer "
                    f"{fmt(model.layer_bytes)})")
    stages = f"in num_stages={num_stages} stages" if num_stages else f"on at most {min(n, len(gpus))} stages"
    return SplitError(
        f"cannot place the model's {n} layers {stages} over {len(gpus)} GPUs: the biggest GPU holds "
        f"{fmt(biggest)}, {smallest}; the whole model needs {fmt(model.memory(0, n))} with "
        f"bytes_per_param={model.bytes_per_param:g} and kv_bytes_per_layer={kv_bytes_per_layer:g}. Use more GPUs or "
        f"GPUs with more memory, a smaller bytes_per_param (2 for bf16), less KV headroom"
        + (", or another num_stages" if num_stages else ""))


def place_replicas(placements: Sequence[StagePlacement], gpus: Sequence[Gpu], counts: Sequence[int]) -> list[list[Gpu]]:
    """GPUs for every replica of every stage: replica 0 where `place` put it, the others on free GPUs.

    Stage boundaries are fixed by `place`; replica r of stage k takes the fastest free GPU with the
    memory for that stage, preferring the host of replica r of stage k-1 (its hops stay on the
    host). Raises SplitError naming the stage when no free GPU can hold another replica.
    """
    if len(counts) != len(placements):
        raise SplitError(f"{len(counts)} replica counts for {len(placements)} placed stages: give one per stage")
    used = {(p.gpu.host, p.gpu.index) for p in placements}
    result = [[p.gpu] for p in placements]
    for r in range(1, max(counts, default=1)):
        prev_host: str | None = None
        for k, p in enumerate(placements):
            if counts[k] <= r:
                prev_host = None
                continue
            free = [g for g in gpus if (g.host, g.index) not in used and g.memory_bytes >= p.memory_bytes]
            if not free:
                raise SplitError(
                    f"stage {k} ({p.stage.label}) needs {p.memory_bytes / GIB:.2f} GiB for replica {r}, and no free "
                    f"GPU of the topology has it: lower replicas_per_stage or add GPUs")
            best = max(free, key=lambda g: (g.speed, g.host == prev_host, -gpus.index(g)))
            used.add((best.host, best.index))
            result[k].append(best)
            prev_host = best.host
    return result
