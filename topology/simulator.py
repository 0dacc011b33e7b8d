"""A seeded discrete-event simulation of requests flowing through stage replicas (pure Python + numpy).

It compares routing policies on a synthetic multi-region cluster: tokens/s, p50/p99 latency and
time to first token. No Ray, no actors: a heap of timestamped events, fully deterministic for a seed.

Cluster (`synthetic_cluster`, all numbers seeded):
- Hosts of 8 GPUs in `regions` regions. A host hangs off its region's switch by a 0.05-0.25 ms link of
  100, 200 or 400 Gb/s (host to host in a region: 0.1-0.5 ms); the region switches form a full mesh of
  20-80 ms, 10-100 Gb/s WAN links; two GPUs of one host talk over NVLink (0.01 ms, 600 Gb/s). Each
  region has a router node 0.05 ms / 100 Gb/s from its switch; requests arrive at a uniformly
  chosen region's router.
- Three GPU generations, one per host, with relative speeds 1.0 / 2.0 / 3.5 (memory bandwidth of a
  V100-, A100- and H100-class part: 0.9, 2.0, 3.35 TB/s), mixed differently per region
  (`REGION_MIX`: region 0 mostly new parts, region 2 mostly old ones).
- One replica per GPU; GPU g serves stage `perm[g] % S` for a seeded permutation (replicas land
  wherever a GPU was free, as an autoscaler places them), and replica ids within a stage are a
  seeded shuffle (creation order, unrelated to location).

Model (`ModelShape`, default a Llama-2-70B-class decoder: 80 layers, hidden 8192, GQA). Pipelining
a model over many GPUs is what one does when it does not fit one GPU; a 7B model would fit one.
- A layer holds ~0.86 B parameters = 1.71 GB in bf16. A decode step at batch 1 is memory-bound:
  reading the weights at ~0.85 TB/s takes ~2.0 ms a layer on a speed-1.0 GPU (`layer_ms`); a stage
  of L layers on a GPU of speed v takes `compute_ms = L * layer_ms / v` (10 layers: 20 ms .. 5.7 ms).
- Continuous batching: a replica is a FIFO server that, whenever it is idle and sequences wait,
  runs one step over up to `max_batch` of them (decode sequences count 1 token, a prefill counts its
  prompt length) and takes `compute_ms * (1 + alpha * (tokens - 1))`. `alpha = 0.015`: one extra
  token costs 2 * 0.86 G flops a layer ~ 0.03 ms at ~60 TFLOP/s on a speed-1.0 GPU, plus its KV-cache
  reads, against 2 ms of weight reads; so a batch of 64 costs ~1.9x a batch of 1 (as on real GPUs),
  and a 512-token prefill ~8.7x a decode step. Items arriving during a step wait for the next one.
- A request keeps ONE route (a replica per stage) for its whole life: its KV cache lives there.
  It makes `gen_tokens` passes: the first is the prefill (prompt_len tokens), each pass yields one
  token at the router. A pass goes router -> stage 0 -> ... -> stage S-1 -> router; each hop costs
  the topology's transfer time (README, Topology YAML: latency + bytes * 8 / bandwidth, summed over the links
  of the host-to-host shortest path) for its message: token ids (4 bytes a token) into stage 0,
  activations (hidden * 2 bytes a token) between stages, the sampled token (16 bytes) back.
  Links are not contended (bandwidth only adds serialisation time), which flatters the policies
  that cross the WAN most (random, round-robin).

Policies (chosen once per request, at admission):
- "shortest": the planner (`topology.planner.plan`, method "dp") over the router's own cost model
  (topology/costs.py): each replica's `step_ms` and `queue_ms` follow its active sequences and the
  moving averages of its simulated steps (step ms, ms a token), as the router measures them; its
  step average starts at its batch-1 step (a warm-up), and `inbound_ms` is known. The router's
  `load_knee` defaults to the model's (`ModelShape.load_knee`: where a step's time doubles, ~68).
  Load-aware; the routers share the load counts.
- "shortest_static": the planner without the load term (every request of a region takes the same route).
- "random": a uniformly random replica per stage. "round_robin": one counter per stage.

Results per policy (`SimResult.summary`): tokens/s = generated tokens / the time from 0 to the last
completion; latency = completion - arrival; TTFT = first token at the router - arrival; plus the
mean busy fraction of the GPUs, the mean batch, and the share of hops that cross regions.

Load. The default arrival rate is 65 % (`LOAD`) of round-robin's saturation rate
(`round_robin_capacity_per_s`: where its slowest replicas would run full batches; 720/s on the
default cluster, so 468/s). Reaching that steady state takes rate x latency ~ 468/s x 60 s ~ 28k
requests in flight (Little's law: round-robin and random spend ~0.4 s a token on WAN hops), while a
pure-Python event loop handles ~10^6 events a second. So the default 2,000 requests (~290k tokens,
~4.6 M events a policy, ~25 s for the three default policies) arrive in ~4 s and are all in flight together: a
finite load that leaves GPUs 15-30 % busy, not the steady state. `--requests 20000` (~3 minutes)
gets them 45-60 % busy.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from topology.costs import LOAD_KNEE, ema, queue_ms, step_ms
from topology.graph import Topology, cheapest, edge_ms
from topology.planner import HostCosts, ReplicaState, plan

log = logging.getLogger(__name__)

POLICIES = ("shortest", "shortest_static", "random", "round_robin")
DEFAULT_POLICIES = ("shortest", "random", "round_robin")
# (name, relative speed, GB a GPU) of the three GPU generations
GENERATIONS = (("v100-class", 1.0, 32.0), ("a100-class", 2.0, 80.0), ("h100-class", 3.5, 80.0))
REGION_MIX = ((0.2, 0.3, 0.5), (0.4, 0.4, 0.2), (0.6, 0.3, 0.1))  # P(generation) per region (cycled)
NVLINK = (0.01, 600.0)  # (latency ms, Gb/s) between two GPUs of one host
LOAD = 0.65  # the default arrival rate, as a fraction of round-robin's saturation rate

_ARRIVE, _AT, _DONE, _FINISH = 0, 1, 2, 3  # event kinds


@dataclass(frozen=True)
class ModelShape:
    """The served model, as far as timing goes (default: a Llama-2-70B-class decoder)."""

    name: str = "llama-70b-class"  # what the numbers describe
    layers: int = 80  # decoder layers, split evenly over the stages
    hidden: int = 8192  # activation width: a hop carries hidden * act_bytes bytes a token
    act_bytes: int = 2  # bf16 activations
    token_bytes: int = 4  # a token id (router -> stage 0)
    reply_bytes: int = 16  # the sampled token id and its logprob (last stage -> router)
    layer_ms: float = 2.0  # one decode step of one layer at batch 1 on a speed-1.0 GPU
    alpha: float = 0.015  # each extra token in a step adds alpha x the batch-1 step time
    max_batch: int = 64  # sequences in one step (continuous batching)

    @property
    def load_knee(self) -> float:
        """The router's load_knee for this model: sequences at which a step takes twice a batch-1 step,
        1 + alpha x (k - 1) = 2, so k = 1 + 1 / alpha."""
        return 1 + 1 / self.alpha


@dataclass
class SimCluster:
    """Replicas on a topology, with the transfer-time matrices the simulator and the planner use."""

    topology: Topology  # hosts, region switches and routers as a graph
    nodes: list[str]  # every topology node: the index of the matrices below
    latency_ms: np.ndarray  # (N, N) summed link latency along the cheapest path; NVLink on host diagonals
    ms_per_byte: np.ndarray  # (N, N) summed 8 / bandwidth along that path (ms a byte)
    region: np.ndarray  # (N,) region of each node
    routers: list[int]  # node index of each region's router
    num_stages: int  # S
    model: ModelShape  # timing of the served model
    stage: np.ndarray  # (R,) stage of each replica
    replica: np.ndarray  # (R,) replica id within its stage
    host: np.ndarray  # (R,) node index of each replica's host
    gpu: list[str]  # (R,) a name per replica's GPU ("host/gpuK"): the planner's hosts
    speed: np.ndarray  # (R,) relative GPU speed
    compute_ms: np.ndarray  # (R,) batch-1 step time
    inbound_ms: np.ndarray | None = None  # (R,) extra delay of every message into each replica (None: 0)
    _planner_costs: HostCosts | None = field(default=None, repr=False)  # cached, see planner_costs

    @property
    def num_replicas(self) -> int:
        """R: one replica a GPU."""
        return len(self.stage)

    def transfer_ms(self, a: int, b: int, nbytes: float) -> float:
        """Time to send `nbytes` from node `a` to node `b` (node indices)."""
        return float(self.latency_ms[a, b] + nbytes * self.ms_per_byte[a, b])

    def planner_costs(self) -> HostCosts:
        """GPU-to-GPU (and router) transfer times of one decode activation, for the planner (cached).

        The planner's "hosts" are GPUs so that two GPUs of one host pay NVLink (its diagonal must be 0).
        """
        if self._planner_costs is None:
            nbytes = self.model.hidden * self.model.act_bytes
            node_ms = self.latency_ms + nbytes * self.ms_per_byte  # (N, N)
            at = np.concatenate([self.host, np.asarray(self.routers, dtype=np.int64)])  # (R + routers,)
            ms = node_ms[np.ix_(at, at)]
            np.fill_diagonal(ms, 0.0)
            self._planner_costs = HostCosts(self.gpu + [self.nodes[r] for r in self.routers], ms)
        return self._planner_costs

    def describe(self) -> str:
        """One line for the log."""
        gens = {f"{s:g}x": int((self.speed == s).sum()) for s in sorted(set(self.speed.tolist()))}
        per_stage = np.bincount(self.stage, minlength=self.num_stages)
        return (f"{self.num_replicas} GPUs on {int((np.bincount(self.host) > 0).sum())} hosts in "
                f"{len(self.routers)} regions; {self.num_stages} stages of "
                f"{per_stage.min()}-{per_stage.max()} replicas; GPU speeds {gens}; {self.model.name}, "
                f"compute {self.compute_ms.min():.1f}-{self.compute_ms.max():.1f} ms/step")


def _layers_per_stage(model: ModelShape, num_stages: int) -> list[int]:
    """Layers of each stage: an even split, the first stages taking one more when it does not divide."""
    base, extra = divmod(model.layers, num_stages)
    return [base + (s < extra) for s in range(num_stages)]


def build_cluster(topology: Topology, placements: Sequence[tuple[int, str, float]], routers: Sequence[str],
                  num_stages: int, model: ModelShape = ModelShape(), region: Mapping[str, int] | None = None,
                  replica_ids: Sequence[int] | None = None,
                  nvlink: tuple[float, float] = NVLINK) -> SimCluster:
    """A SimCluster from a topology and one (stage, host, speed) per replica; `routers` name nodes.

    `region` maps nodes to regions (default all 0); `replica_ids` gives each replica its id within its
    stage (default: numbered in order). Transfer times follow the cheapest path for a decode message.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}: must be >= 1")
    if num_stages > model.layers:
        raise ValueError(f"num_stages={num_stages}: more stages than the model's {model.layers} layers")
    if not routers:
        raise ValueError("routers: name at least one router node")
    g = topology.graph
    nodes = list(g)
    index = {n: i for i, n in enumerate(nodes)}
    for r in routers:
        if r not in index:
            raise ValueError(f"routers: unknown node {r!r}")
    per_byte = 8e-6  # ms a byte at 1 Gb/s
    nbytes = model.hidden * model.act_bytes

    def weight(a: str, b: str, e: dict) -> float:
        return edge_ms(e, nbytes)

    n = len(nodes)
    lat = np.full((n, n), np.inf)  # (N, N)
    mpb = np.full((n, n), np.inf)  # (N, N)
    for src, paths in nx.all_pairs_dijkstra_path(g, weight=weight):
        i = index[src]
        for dst, path in paths.items():
            l = b = 0.0
            for u, v in zip(path, path[1:]):
                e = cheapest(g.edges[u, v], nbytes)
                l += e["latency_ms"]
                b += per_byte / e["bandwidth_gbps"] if e["bandwidth_gbps"] else 0.0
            lat[i, index[dst]], mpb[i, index[dst]] = l, b
    for i in range(n):  # two GPUs of one host: NVLink; a router to itself: free
        has_gpus = bool(g.nodes[nodes[i]].get("gpus"))
        lat[i, i], mpb[i, i] = (nvlink[0], per_byte / nvlink[1]) if has_gpus else (0.0, 0.0)

    stage = np.array([p[0] for p in placements], dtype=np.int64)
    if len(stage) and (stage.min() < 0 or stage.max() >= num_stages):
        raise ValueError(f"placements: stages must lie in 0..{num_stages - 1}")
    missing = sorted(set(range(num_stages)) - set(stage.tolist()))
    if missing:
        raise ValueError(f"placements: stages {missing} have no replica")
    unknown = sorted({p[1] for p in placements} - set(index))
    if unknown:
        raise ValueError(f"placements: unknown hosts {unknown}: add them to the topology")
    host = np.array([index[p[1]] for p in placements], dtype=np.int64)
    speed = np.array([p[2] for p in placements], dtype=np.float64)
    if not (np.isfinite(speed) & (speed > 0)).all():  # a NaN speed made every step time NaN
        raise ValueError("placements: GPU speeds must be finite and > 0")
    if replica_ids is not None and len(replica_ids) != len(placements):
        raise ValueError(f"replica_ids: {len(replica_ids)} ids for {len(placements)} placements: "
                         "give one each")
    if replica_ids is None:
        counts: dict[int, int] = {}
        replica_ids = []
        for s in stage.tolist():
            replica_ids.append(counts.get(s, 0))
            counts[s] = counts.get(s, 0) + 1
    layers = np.array(_layers_per_stage(model, num_stages), dtype=np.float64)
    slot: dict[int, int] = {}
    gpu = []
    for h in host.tolist():
        gpu.append(f"{nodes[h]}/gpu{slot.get(h, 0)}")
        slot[h] = slot.get(h, 0) + 1
    region = region or {}
    return SimCluster(
        topology=topology, nodes=nodes, latency_ms=lat, ms_per_byte=mpb,
        region=np.array([region.get(x, 0) for x in nodes], dtype=np.int64),
        routers=[index[r] for r in routers], num_stages=num_stages, model=model, stage=stage,
        replica=np.asarray(replica_ids, dtype=np.int64), host=host, gpu=gpu, speed=speed,
        compute_ms=layers[stage] * model.layer_ms / speed)


def synthetic_cluster(num_gpus: int = 1000, regions: int = 3, gpus_per_host: int = 8, num_stages: int = 8,
                      seed: int = 0, model: ModelShape = ModelShape()) -> SimCluster:
    """A seeded multi-region cluster, one replica per GPU (see the module docstring for the numbers)."""
    if not (isinstance(num_stages, int) and num_stages >= 1):
        raise ValueError(f"num_stages={num_stages!r}: must be an int >= 1")
    if not (isinstance(num_gpus, int) and num_gpus >= num_stages):
        raise ValueError(f"num_gpus={num_gpus!r}: must be an int >= num_stages={num_stages} "
                         "(at least one replica per stage)")
    if not (isinstance(gpus_per_host, int) and gpus_per_host >= 1):
        raise ValueError(f"gpus_per_host={gpus_per_host!r}: must be an int >= 1")
    num_hosts = math.ceil(num_gpus / gpus_per_host)
    if not (isinstance(regions, int) and 1 <= regions <= num_hosts):
        raise ValueError(f"regions={regions!r}: must be an int in 1..{num_hosts} (the number of hosts)")
    rng = np.random.default_rng(seed)
    nodes: dict[str, Any] = {}
    links: list[dict[str, Any]] = []
    region: dict[str, int] = {}
    hosts, host_speed, host_gpus = [], [], []
    for h in range(num_hosts):
        r = h * regions // num_hosts  # contiguous blocks of hosts per region
        gen = int(rng.choice(len(GENERATIONS), p=REGION_MIX[r % len(REGION_MIX)]))
        _, speed, mem = GENERATIONS[gen]
        gpus = min(gpus_per_host, num_gpus - h * gpus_per_host)
        name = f"r{r}-h{h:03d}"
        nodes[name] = {"gpus": gpus, "gpu_memory_gb": mem, "tflops": 100.0 * speed}  # tflops: speed x 100
        links.append({"a": name, "b": f"r{r}-switch", "latency_ms": float(rng.uniform(0.05, 0.25)),
                      "bandwidth_gbps": float(rng.choice([100.0, 200.0, 400.0]))})
        region[name] = r
        hosts.append(name)
        host_speed.append(speed)
        host_gpus.append(gpus)
    for r in range(regions):
        nodes[f"r{r}-switch"] = {}
        nodes[f"r{r}-router"] = {}
        region[f"r{r}-switch"] = region[f"r{r}-router"] = r
        links.append({"a": f"r{r}-router", "b": f"r{r}-switch", "latency_ms": 0.05, "bandwidth_gbps": 100.0})
    for a, b in itertools.combinations(range(regions), 2):
        links.append({"a": f"r{a}-switch", "b": f"r{b}-switch", "latency_ms": float(rng.uniform(20.0, 80.0)),
                      "bandwidth_gbps": float(rng.choice([10.0, 25.0, 40.0, 100.0]))})
    topo = Topology.from_dict({"nodes": nodes, "links": links}, where="synthetic_cluster")
    gpu_host = np.repeat(np.arange(num_hosts), host_gpus)  # (G,)
    gpu_stage = rng.permutation(np.arange(num_gpus) % num_stages)  # (G,)
    replica_ids = np.zeros(num_gpus, dtype=np.int64)
    for s in range(num_stages):
        mine = np.flatnonzero(gpu_stage == s)
        replica_ids[mine] = rng.permutation(len(mine))
    placements = [(int(gpu_stage[g]), hosts[int(gpu_host[g])], host_speed[int(gpu_host[g])])
                  for g in range(num_gpus)]
    cluster = build_cluster(topo, placements, [f"r{r}-router" for r in range(regions)], num_stages, model,
                            region=region, replica_ids=replica_ids.tolist())
    log.info("synthetic cluster: %s", cluster.describe())
    return cluster


@dataclass(frozen=True)
class Request:
    """One request of the workload."""

    arrival_s: float  # when it reaches its router
    router: int  # index into SimCluster.routers (its region)
    prompt_len: int  # prompt tokens: the first pass is their prefill
    gen_tokens: int  # tokens to generate: one pass through the route each


def poisson_workload(requests: int, rate_per_s: float, num_routers: int, seed: int = 0,
                     prompt_len: tuple[int, int] = (64, 512),
                     gen_tokens: tuple[int, int] = (32, 256)) -> list[Request]:
    """`requests` Poisson arrivals at `rate_per_s`, uniform over the routers; lengths uniform (inclusive)."""
    if not (isinstance(requests, int) and requests >= 1):
        raise ValueError(f"requests={requests!r}: must be an int >= 1")
    if not (isinstance(rate_per_s, (int, float)) and math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s={rate_per_s!r}: must be a finite number > 0")
    for name, (lo, hi) in (("prompt_len", prompt_len), ("gen_tokens", gen_tokens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}={(lo, hi)!r}: need 1 <= low <= high")
    rng = np.random.default_rng([seed, 7])
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, requests))
    routers = rng.integers(0, num_routers, requests)
    prompts = rng.integers(prompt_len[0], prompt_len[1] + 1, requests)
    gens = rng.integers(gen_tokens[0], gen_tokens[1] + 1, requests)
    return [Request(float(a), int(r), int(p), int(g)) for a, r, p, g in zip(arrivals, routers, prompts, gens)]


# ---------------------------------------------------------------------------------------------------
# Policies: each picks a route (global replica indices, one per stage) at admission


class _Chooser:
    """Base policy: `choose(router)` -> replica indices; `admit`/`release` track active sequences,
    `observe` each step run."""

    def __init__(self, cluster: SimCluster, seed: int) -> None:
        self.cluster = cluster
        # per stage: the global indices of its replicas
        self.by_stage = [np.flatnonzero(cluster.stage == s) for s in range(cluster.num_stages)]
        for s, idx in enumerate(self.by_stage):  # ordered by replica id
            self.by_stage[s] = idx[np.argsort(cluster.replica[idx], kind="stable")]

    def choose(self, router: int) -> list[int]:
        """The route of a request arriving at router `router`: a replica index per stage."""
        raise NotImplementedError

    def admit(self, route: list[int]) -> None:
        """A request starts on `route`."""

    def release(self, route: list[int]) -> None:
        """A request on `route` finished."""

    def observe(self, i: int, ms: float, tokens: int) -> None:
        """Replica i ran a step of `tokens` tokens in `ms`."""


class _Random(_Chooser):
    """A uniformly random replica per stage (seeded)."""

    def __init__(self, cluster: SimCluster, seed: int) -> None:
        super().__init__(cluster, seed)
        self.rng = np.random.default_rng([seed, 11])
        self.sizes = np.array([len(i) for i in self.by_stage])

    def choose(self, router: int) -> list[int]:
        picks = self.rng.integers(0, self.sizes)  # (S,)
        return [int(idx[p]) for idx, p in zip(self.by_stage, picks.tolist())]


class _RoundRobin(_Chooser):
    """One counter per stage, advanced at every admission."""

    def __init__(self, cluster: SimCluster, seed: int) -> None:
        super().__init__(cluster, seed)
        self.counter = [0] * cluster.num_stages

    def choose(self, router: int) -> list[int]:
        out = []
        for s, idx in enumerate(self.by_stage):
            out.append(int(idx[self.counter[s] % len(idx)]))
            self.counter[s] += 1
        return out


class _Shortest(_Chooser):
    """The planner over `topology.costs`; with `load`, each replica's costs follow its sequences and steps."""

    def __init__(self, cluster: SimCluster, seed: int, load: bool, load_knee: float = LOAD_KNEE) -> None:
        super().__init__(cluster, seed)
        self.load, self.load_knee = load, load_knee
        self.costs = cluster.planner_costs()
        inbound = np.zeros(cluster.num_replicas) if cluster.inbound_ms is None else cluster.inbound_ms
        self.states = [ReplicaState(stage=int(s), replica=int(r), host=g, compute_ms=float(c), inbound_ms=float(b))
                       for s, r, g, c, b in zip(cluster.stage, cluster.replica, cluster.gpu, cluster.compute_ms,
                                                inbound)]
        self.gid = {(int(s), int(r)): i for i, (s, r) in enumerate(zip(cluster.stage, cluster.replica))}
        self.active = [0] * cluster.num_replicas
        self.step_avg: list[float] = cluster.compute_ms.tolist()  # moving average of each replica's step ms
        self.token_avg: list[float | None] = [None] * cluster.num_replicas  # ... of its ms a token
        self.router_names = [cluster.nodes[r] for r in cluster.routers]

    def choose(self, router: int) -> list[int]:
        name = self.router_names[router]
        route = plan(self.states, self.cluster.num_stages, self.costs, name, name, method="dp")
        return [self.gid[(s, r)] for s, r in enumerate(route.replicas)]

    def _update(self, i: int) -> None:
        """Replica i's planner state from its averages and load, as `ReplicaTable.states` computes it."""
        st, n = self.states[i], self.active[i]
        st.compute_ms = step_ms(self.step_avg[i], self.token_avg[i], n)
        st.queue_ms = queue_ms(st.compute_ms, n, self.load_knee)

    def admit(self, route: list[int]) -> None:
        if self.load:
            for i in route:
                self.active[i] += 1
                self._update(i)

    def release(self, route: list[int]) -> None:
        if self.load:
            for i in route:
                self.active[i] -= 1
                self._update(i)

    def observe(self, i: int, ms: float, tokens: int) -> None:
        if self.load:
            self.step_avg[i] = ema(self.step_avg[i], ms)
            self.token_avg[i] = ema(self.token_avg[i], ms / tokens)
            self._update(i)


def _chooser(cluster: SimCluster, policy: str, seed: int, load_knee: float = LOAD_KNEE) -> _Chooser:
    """The policy object for `policy` (ValueError naming it when unknown)."""
    if policy == "shortest":
        return _Shortest(cluster, seed, load=True, load_knee=load_knee)
    if policy == "shortest_static":
        return _Shortest(cluster, seed, load=False)
    if policy == "random":
        return _Random(cluster, seed)
    if policy == "round_robin":
        return _RoundRobin(cluster, seed)
    raise ValueError(f"policy={policy!r}: choose one of {', '.join(POLICIES)}")


# ---------------------------------------------------------------------------------------------------
# The event loop


@dataclass
class SimResult:
    """What one simulated run measured (times in ms unless named _s)."""

    policy: str  # the routing policy
    latency_ms: np.ndarray  # (n,) completion - arrival per request
    ttft_ms: np.ndarray  # (n,) first token at the router - arrival per request
    tokens: np.ndarray  # (n,) tokens generated per request
    routes: list[list[int]]  # (n, S) global replica index per stage per request
    end_ms: float  # the last completion (the run starts at 0)
    busy_ms: np.ndarray  # (R,) time each replica spent running steps
    steps: int  # steps run over all replicas
    batched: int  # sequences processed over all steps
    cross_region_hops: int  # hops (router legs included) between nodes of different regions
    hops: int  # all hops
    wall_s: float  # wall-clock time of the run

    def summary(self, cluster: SimCluster) -> dict[str, Any]:
        """The benchmark's JSON line."""
        sim_s = self.end_ms / 1000
        lat, ttft = self.latency_ms / 1000, self.ttft_ms / 1000
        return {
            "bench": "simulator", "policy": self.policy, "gpus": cluster.num_replicas,
            "hosts": int((np.bincount(cluster.host) > 0).sum()), "regions": len(cluster.routers),
            "stages": cluster.num_stages, "requests": len(lat), "tokens": int(self.tokens.sum()),
            "sim_seconds": round(sim_s, 3), "tokens_per_s": round(float(self.tokens.sum()) / sim_s, 1),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
            "gpu_busy": round(float(self.busy_ms.sum() / (len(self.busy_ms) * self.end_ms)), 3),
            "mean_batch": round(self.batched / max(self.steps, 1), 2),
            "cross_region_hops": round(self.cross_region_hops / max(self.hops, 1), 3),
            "wall_s": round(self.wall_s, 2),
        }


def simulate(cluster: SimCluster, workload: Sequence[Request], policy: str = "shortest",
             seed: int = 0, load_knee: float | None = None) -> SimResult:
    """Run `workload` through `cluster` under `policy`; deterministic for (cluster, workload, seed).

    `load_knee`: the router's (RouterConfig.load_knee) for the "shortest" policy's queue wait;
    None: the model's (`ModelShape.load_knee`).
    """
    chooser = _chooser(cluster, policy, seed, cluster.model.load_knee if load_knee is None else load_knee)
    for i, w in enumerate(workload):
        if not 0 <= w.router < len(cluster.routers):
            raise ValueError(f"workload[{i}].router={w.router}: there are {len(cluster.routers)} routers")
        if w.prompt_len < 1 or w.gen_tokens < 1:
            raise ValueError(f"workload[{i}]: prompt_len and gen_tokens must be >= 1")
    wall = time.perf_counter()
    m, num_stages = cluster.model, cluster.num_stages
    alpha, max_batch, last = m.alpha, m.max_batch, num_stages - 1
    lat, mpb, region = cluster.latency_ms, cluster.ms_per_byte, cluster.region
    compute = cluster.compute_ms.tolist()
    host = cluster.host.tolist()
    inbound = [0.0] * cluster.num_replicas if cluster.inbound_ms is None else cluster.inbound_ms.tolist()
    observe = chooser.observe
    act, tok, reply = m.hidden * m.act_bytes, m.token_bytes, m.reply_bytes
    n, num_rep = len(workload), cluster.num_replicas

    route: list[list[int]] = [[] for _ in range(n)]
    hop_pre: list[list[float]] = [[] for _ in range(n)]  # per stage: transfer into it during the prefill pass
    hop_dec: list[list[float]] = [[] for _ in range(n)]  # ... during a decode pass
    back_pre, back_dec = [0.0] * n, [0.0] * n  # last stage -> router
    work = [1] * n  # tokens a step processes for the request: prompt_len in its prefill pass, then 1
    pos, left = [0] * n, [w.gen_tokens for w in workload]
    arrival = [w.arrival_s * 1000 for w in workload]
    ttft, finish, produced = [0.0] * n, [0.0] * n, [0] * n
    waiting = [deque() for _ in range(num_rep)]
    running: list[list[int] | None] = [None] * num_rep
    busy = [0.0] * num_rep
    steps = batched = cross = hops = 0

    heap: list[tuple[float, int, int, int, int]] = [(arrival[i], i, _ARRIVE, i, 0) for i in range(n)]
    heapq.heapify(heap)
    seq = n  # tie-breaker: events at equal times run in the order they were scheduled
    push, pop = heapq.heappush, heapq.heappop
    work_of = work.__getitem__

    while heap:
        t, _, kind, a, b = pop(heap)
        if kind == _AT:  # request b reaches replica a
            if running[a] is None:  # idle (so nothing waits): a step for b alone starts now
                dur = compute[a] * (1 + alpha * (work[b] - 1))
                observe(a, dur, work[b])
                busy[a] += dur
                steps += 1
                batched += 1
                running[a] = [b]
                seq += 1
                push(heap, (t + dur, seq, _DONE, a, 0))
            else:
                waiting[a].append(b)
        elif kind == _DONE:  # replica a finished a step
            for i in running[a]:
                s = pos[i]
                pre = produced[i] == 0
                seq += 1
                if s < last:
                    pos[i] = s + 1
                    push(heap, (t + (hop_pre[i] if pre else hop_dec[i])[s + 1], seq, _AT, route[i][s + 1], i))
                    continue
                t_tok = t + (back_pre[i] if pre else back_dec[i])
                produced[i] += 1
                left[i] -= 1
                if pre:
                    ttft[i] = t_tok - arrival[i]
                    work[i] = 1
                if left[i] == 0:
                    push(heap, (t_tok, seq, _FINISH, i, 0))
                else:
                    pos[i] = 0
                    push(heap, (t_tok + hop_dec[i][0], seq, _AT, route[i][0], i))
            q = waiting[a]
            if not q:
                running[a] = None
                continue
            if len(q) <= max_batch:  # the next step takes every waiting sequence (FIFO up to max_batch)
                batch = list(q)
                q.clear()
            else:
                batch = [q.popleft() for _ in range(max_batch)]
            n_tok = sum(map(work_of, batch))
            dur = compute[a] * (1 + alpha * (n_tok - 1))
            observe(a, dur, n_tok)
            busy[a] += dur
            steps += 1
            batched += len(batch)
            running[a] = batch
            seq += 1
            push(heap, (t + dur, seq, _DONE, a, 0))
        elif kind == _ARRIVE:  # request a reaches its router: admit it on a route
            w = workload[a]
            rt = chooser.choose(w.router)
            chooser.admit(rt)
            route[a] = rt
            nodes = [cluster.routers[w.router]] + [host[r] for r in rt] + [cluster.routers[w.router]]
            pre_bytes = [w.prompt_len * tok] + [w.prompt_len * act] * last
            dec_bytes = [tok] + [act] * last
            extra = [inbound[r] for r in rt]  # a slow link into a replica
            hop_pre[a] = [float(lat[u, v] + nb * mpb[u, v]) + x for u, v, nb, x in zip(nodes, nodes[1:], pre_bytes, extra)]
            hop_dec[a] = [float(lat[u, v] + nb * mpb[u, v]) + x for u, v, nb, x in zip(nodes, nodes[1:], dec_bytes, extra)]
            u, v = nodes[-2], nodes[-1]
            back_pre[a] = back_dec[a] = float(lat[u, v] + reply * mpb[u, v])  # the same small message
            crossings = sum(region[u] != region[v] for u, v in zip(nodes, nodes[1:]))
            cross += int(crossings) * w.gen_tokens
            hops += (num_stages + 1) * w.gen_tokens
            work[a] = w.prompt_len
            seq += 1
            push(heap, (t + hop_pre[a][0], seq, _AT, rt[0], a))
        else:  # _FINISH: request a's last token reached the router
            finish[a] = t
            chooser.release(route[a])

    return SimResult(
        policy=policy, latency_ms=np.array(finish) - np.array(arrival), ttft_ms=np.array(ttft),
        tokens=np.array(produced), routes=route, end_ms=max(finish) if n else 0.0, busy_ms=np.array(busy),
        steps=steps, batched=batched, cross_region_hops=cross, hops=hops, wall_s=time.perf_counter() - wall)


def round_robin_capacity_per_s(cluster: SimCluster, prompt_len: tuple[int, int] = (64, 512),
                               gen_tokens: tuple[int, int] = (32, 256)) -> float:
    """Arrivals a second at which round-robin saturates its slowest replica (a steady-state bound).

    Round-robin gives every replica of a stage the same share of the requests. At saturation a replica
    runs full batches, so a request costs it `gen * step(max_batch) / max_batch` for its passes plus
    `compute_ms * alpha * (prompt - 1)` for the rest of its prefill (means of the uniform ranges).
    """
    m = cluster.model
    gen, prompt = sum(gen_tokens) / 2, sum(prompt_len) / 2
    full = 1 + m.alpha * (m.max_batch - 1)  # a full step, in units of compute_ms
    per_request_ms = cluster.compute_ms * (gen * full / m.max_batch + m.alpha * (prompt - 1))  # (R,)
    return min(float(np.sum(cluster.stage == s) / per_request_ms[cluster.stage == s].max() * 1000)
               for s in range(cluster.num_stages))


def bench_simulator(num_gpus: int = 1000, regions: int = 3, num_stages: int = 8, requests: int = 2000,
                    rate_per_s: float | None = None, seed: int = 0,
                    policies: Sequence[str] = DEFAULT_POLICIES) -> Iterator[dict[str, Any]]:
    """One summary dict per policy, all on the same seeded cluster and workload.

    `rate_per_s` defaults to `LOAD` x round-robin's saturation rate (`round_robin_capacity_per_s`).
    """
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"policies: unknown policy {p!r}: choose from {', '.join(POLICIES)}")
    if rate_per_s is not None and not (isinstance(rate_per_s, (int, float)) and rate_per_s > 0):
        raise ValueError(f"rate_per_s={rate_per_s!r}: must be a number > 0 (or None for the default load)")
    cluster = synthetic_cluster(num_gpus=num_gpus, regions=regions, num_stages=num_stages, seed=seed)
    if rate_per_s is None:
        rate_per_s = round(LOAD * round_robin_capacity_per_s(cluster), 1)
        log.info("rate_per_s=%s: %.0f %% of round-robin's saturation rate", rate_per_s, LOAD * 100)
    workload = poisson_workload(requests, rate_per_s, len(cluster.routers), seed=seed)
    for p in policies:
        res = simulate(cluster, workload, p, seed=seed)
        out = res.summary(cluster)
        out["rate_per_s"] = rate_per_s
        log.info("%s", out)
        yield out
