"""The route planner: which replica of each stage serves a request (pure Python, no Ray, no actors).

A route is a shortest path through a layered DAG (Petals-style `start`/`end` sentinels):

    start (the router's host) -> (replica, stage 0) -> (replica, stage 1) -> ... -> (replica, S-1) -> end

Edge `start -> (r, 0)`:        ms[source, host(r)] + node_cost(r)
Edge `(p, s-1) -> (r, s)`:     ms[host(p), host(r)] + node_cost(r)
Edge `(r, S-1) -> end`:        ms[host(r), sink]        (the small sampled-token message)
node_cost(r) = inbound_ms + compute_ms + queue_ms (topology/costs.py); a route's cost is the sum of its edges.

`ms` is a `HostCosts` matrix of host-to-host transfer times (networkx shortest paths over the
`Topology`). The default method, "dp", is an exact dynamic program over the DAG with
the replicas of each stage grouped by host, one (H_prev, H_cur) numpy op a stage; "dijkstra" and
"astar" (networkx over the explicit layered graph) and "brute" (every combination) cross-check it;
"greedy" is the myopic baseline.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from topology.costs import node_cost
from topology.errors import NoRouteError, TopologyError
from topology.graph import Topology

log = logging.getLogger(__name__)

METHODS = ("dp", "dijkstra", "astar", "greedy", "brute")
BRUTE_MAX_COMBINATIONS = 1_000_000
_COST_FIELDS = ("inbound_ms", "compute_ms", "queue_ms")
START, END = "start", "end"  # the sentinels of the layered graph


class PlannerError(TopologyError):
    """A planner input is invalid (the message names the replica and the field)."""


class NoReplicaError(NoRouteError):
    """A stage has no live replica, or no finite-cost route reaches one (the message names the stage)."""


@dataclass
class ReplicaState:
    """What the planner knows about one replica of one stage."""

    stage: int  # stage index 0..S-1
    replica: int  # replica id within its stage (unique per stage, not necessarily 0..k-1 contiguous)
    host: str  # the topology node (host) it runs on
    compute_ms: float = 0.0  # moving average of its step time
    queue_ms: float = 0.0  # expected wait behind its current load
    inbound_ms: float = 0.0  # measured extra delay on messages into it (e.g. a slow link), beyond the topology's estimate
    alive: bool = True  # dead or banned replicas are skipped

    @property
    def node_cost(self) -> float:
        """What passing through this replica costs: `topology.costs.node_cost`."""
        return node_cost(self)

    @property
    def name(self) -> str:
        return f"stage-{self.stage}/replica-{self.replica}"


@dataclass(frozen=True)
class Route:
    """The chosen replica of every stage."""

    replicas: tuple[int, ...]  # the replica id chosen at each stage, len == num_stages
    hosts: tuple[str, ...]  # their hosts
    cost_ms: float  # total cost: transfers + node costs + the way back to the sink

    def describe(self) -> str:
        """One line, Petals-style: 'stage-0/replica-1@hostA -> stage-1/replica-0@hostB (12.3 ms)'."""
        hops = " -> ".join(f"stage-{s}/replica-{r}@{h}" for s, (r, h) in enumerate(zip(self.replicas, self.hosts)))
        return f"{hops} ({self.cost_ms:.1f} ms)"


class HostCosts:
    """Transfer time between hosts for one message size.

    hosts: the host names; index: name -> row; ms: (H, H) float ms, ms[i, i] == 0, inf where unreachable.
    """

    def __init__(self, hosts: Sequence[str], ms: np.ndarray) -> None:
        self.hosts: list[str] = list(hosts)
        self.index: dict[str, int] = {h: i for i, h in enumerate(self.hosts)}
        self.ms: np.ndarray = np.array(ms, dtype=np.float64)  # (H, H)
        h = len(self.hosts)
        if len(self.index) != h:
            raise PlannerError(f"HostCosts: duplicate host names in {self.hosts}")
        if self.ms.shape != (h, h):
            raise PlannerError(f"HostCosts: ms has shape {self.ms.shape}, expected ({h}, {h}) for {h} hosts")
        if np.isnan(self.ms).any() or (self.ms < 0).any():
            i, j = np.argwhere(np.isnan(self.ms) | (self.ms < 0))[0]
            raise PlannerError(f"HostCosts: ms[{self.hosts[i]!r}, {self.hosts[j]!r}] = {self.ms[i, j]} "
                               "must be >= 0 (inf for unreachable)")
        if h and np.diagonal(self.ms).any():
            raise PlannerError("HostCosts: ms[i, i] must be 0 (a message to the same host is free)")

    @classmethod
    def from_topology(cls, topo: Topology, nbytes: float) -> HostCosts:
        """All-pairs cheapest transfer times over `topo` for a message of `nbytes` (networkx)."""
        hosts, ms = topo.transfer_matrix(nbytes)
        return cls(hosts, ms)

    @classmethod
    def uniform(cls, hosts: Iterable[str], ms_between: float = 0.0) -> HostCosts:
        """Every pair of distinct hosts `ms_between` apart (tests, a single machine)."""
        hosts = list(hosts)
        ms = np.full((len(hosts), len(hosts)), float(ms_between))
        np.fill_diagonal(ms, 0.0)
        return cls(hosts, ms)

    def cost(self, a: str, b: str) -> float:
        """ms from host `a` to host `b`."""
        return float(self.ms[self._at(a, "host"), self._at(b, "host")])

    def _at(self, host: str, what: str) -> int:
        try:
            return self.index[host]
        except KeyError:
            raise TopologyError(f"{what} {host!r} is not in the topology (hosts are {sorted(self.hosts)}): "
                                "add it to the topology") from None

    def __repr__(self) -> str:
        return f"HostCosts({len(self.hosts)} hosts)"


# ---------------------------------------------------------------------------------------------------
# Inputs, validated and grouped by stage


@dataclass
class _Stage:
    """The live replicas of one stage, sorted by replica id."""

    ids: np.ndarray  # (k,) int64 replica ids, ascending
    hosts: np.ndarray  # (k,) int64 host rows in HostCosts
    node: np.ndarray  # (k,) float64 node_cost
    dead: list[int]  # ids of the dead replicas (for error messages)


@dataclass
class _Problem:
    stages: list[_Stage]  # one per stage
    costs: HostCosts
    src: int  # host row of `start`
    snk: int  # host row of `end`


def _prepare(replicas: Sequence[ReplicaState], num_stages: int, costs: HostCosts, source: str,
             sink: str | None) -> _Problem:
    """Validate the inputs and group the live replicas by stage (one pass in Python).

    Only scalars are appended in the loop (no tuples), so 10,000 replicas trigger no cyclic GC pass.
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise PlannerError(f"num_stages={num_stages!r}: must be an int >= 1")
    src = costs._at(source, "source host")
    snk = src if sink is None else costs._at(sink, "sink host")
    index = costs.index
    ids: list[list[int]] = [[] for _ in range(num_stages)]  # live replica ids per stage
    rows: list[list[int]] = [[] for _ in range(num_stages)]  # their host rows
    node: list[list[float]] = [[] for _ in range(num_stages)]  # their node costs
    dead: list[list[int]] = [[] for _ in range(num_stages)]  # dead replica ids per stage
    for r in replicas:
        s = r.stage
        if not (isinstance(s, (int, np.integer)) and 0 <= s < num_stages):
            raise PlannerError(f"replica {r.replica!r} on {r.host!r}: stage={s!r} is outside 0..{num_stages - 1} "
                               f"(num_stages={num_stages})")
        if not r.alive:
            dead[s].append(r.replica)
            continue
        a, b, c = r.inbound_ms, r.compute_ms, r.queue_ms
        if not (a >= 0 and b >= 0 and c >= 0):  # also catches NaN; name the field at fault
            f, v = next((f, v) for f, v in zip(_COST_FIELDS, (a, b, c)) if not v >= 0)
            raise PlannerError(f"stage-{s}/replica-{r.replica}: {f}={v!r} must be >= 0 "
                               "(a time in ms; report 0 when unknown)")
        h = index.get(r.host)
        if h is None:
            raise TopologyError(f"stage-{s}/replica-{r.replica}: host {r.host!r} is not in the topology "
                                f"(hosts are {sorted(costs.hosts)}): add it to the topology or move the replica")
        ids[s].append(r.replica)
        rows[s].append(h)
        node[s].append(node_cost(r))
    stages = []
    for s in range(num_stages):
        every = np.sort(np.array(ids[s] + dead[s], dtype=np.int64))
        if len(every) > 1 and (dup := every[1:][every[1:] == every[:-1]]).size:
            raise PlannerError(f"stage-{s}/replica-{dup[0]}: listed twice; replica ids must be unique per stage")
        if not ids[s]:
            what = f"replicas {sorted(dead[s])} are dead" if dead[s] else "none is deployed"
            raise NoReplicaError(f"stage {s} has no live replica: {what}; start (or revive) a replica of stage {s}")
        sid = np.array(ids[s], dtype=np.int64)  # (k,)
        o = np.argsort(sid, kind="stable")
        stages.append(_Stage(ids=sid[o], hosts=np.array(rows[s], dtype=np.int64)[o],
                             node=np.array(node[s], dtype=np.float64)[o], dead=dead[s]))
    return _Problem(stages=stages, costs=costs, src=src, snk=snk)


def _raise_unreachable(p: _Problem) -> None:
    """Raise NoReplicaError naming the first stage that no finite-cost path reaches."""
    ms, hosts = p.costs.ms, p.costs.hosts
    reach = np.array([p.src])  # host rows reachable with a finite cost so far
    for s, st in enumerate(p.stages):
        ok = np.isfinite(ms[np.ix_(reach, st.hosts)]).any(axis=0) & np.isfinite(st.node)  # (k,)
        if not ok.any():
            frm = f"the source host {hosts[p.src]!r}" if s == 0 else \
                f"the reachable hosts of stage {s - 1} {sorted({hosts[i] for i in reach})}"
            raise NoReplicaError(
                f"stage {s}: no live replica is reachable with a finite cost from {frm} (its replicas are on "
                f"{sorted({hosts[i] for i in st.hosts})}): add a link between them, or a replica of stage {s} "
                "on a reachable host")
        reach = np.unique(st.hosts[ok])
    if not np.isfinite(ms[reach, p.snk]).any():
        raise NoReplicaError(
            f"stage {len(p.stages) - 1} -> sink: the sink host {hosts[p.snk]!r} is unreachable from every "
            f"reachable host of the last stage {sorted({hosts[i] for i in reach})}: add a link to it")
    raise NoRouteError("no finite-cost route was found although every stage is reachable (a bug: report it)")


def _route(p: _Problem, positions: Sequence[int], cost: float) -> Route:
    """A Route from the chosen position (index into `_Stage.ids`) of every stage."""
    ids = tuple(int(st.ids[i]) for st, i in zip(p.stages, positions))
    hosts = tuple(p.costs.hosts[int(st.hosts[i])] for st, i in zip(p.stages, positions))
    return Route(replicas=ids, hosts=hosts, cost_ms=float(cost))


# ---------------------------------------------------------------------------------------------------
# Methods


def _lowest_id(tie: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each column of the (Hp, Hc) bool `tie`, the row whose `ids` entry is lowest among the True rows."""
    return np.where(tie, ids[:, None], np.iinfo(np.int64).max).argmin(axis=0)


def _plan_dp(p: _Problem) -> Route:
    """Exact DP over the layered DAG, replicas grouped by host: one (H_prev, H_cur) min-plus op a stage.

    For stage s: arrive[h'] = min_h best[h] + ms[h, h'] over the previous stage's hosts h; each replica
    costs arrive[its host] + node_cost; best[h'] = its host's cheapest replica. Ties go to the lowest
    replica id, the last stage first.
    """
    ms = p.costs.ms  # (H, H)
    flat, num_hosts = ms.ravel(), ms.shape[0]
    prev_hosts = np.array([p.src])  # (Hp,) host rows of the previous layer's slots, ascending
    prev_best = np.zeros(1)  # (Hp,) cheapest cost to have the message on each slot's host
    prev_ids = np.zeros(1, dtype=np.int64)  # (Hp,) the replica id holding it there (tie-break)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per stage: (chosen replica position, predecessor slot)
    for st in p.stages:
        uhosts, inv = np.unique(st.hosts, return_inverse=True)  # (Hc,) ascending, (k,)
        cols = np.arange(len(uhosts))
        # one flat gather, rows in ascending order (cache friendly): ~7x faster than ms[np.ix_(...)]
        t = flat.take(prev_hosts[:, None] * num_hosts + uhosts[None, :])  # (Hp, Hc)
        t += prev_best[:, None]
        pred = t.argmin(axis=0)  # (Hc,) predecessor slot of each host
        arrive = t[pred, cols]  # (Hc,)
        if len(prev_hosts) > 1:
            tie = t == arrive  # (Hp, Hc)
            if np.count_nonzero(tie) > len(cols):  # equal-cost predecessors: the lowest replica id wins
                pred = _lowest_id(tie, prev_ids)
        cost = arrive[inv] + st.node  # (k,) cheapest cost through each replica
        order = np.lexsort((cost, inv))  # by host, then cost, then position (= replica id, stable)
        inv_o = inv[order]
        first = order[np.r_[True, inv_o[1:] != inv_o[:-1]]]  # (Hc,) best replica position of each host
        best = cost[first]  # (Hc,)
        slots = np.flatnonzero(np.isfinite(best))  # drop the hosts no finite path reaches
        if not len(slots):
            _raise_unreachable(p)
        back.append((first[slots], pred[slots]))
        prev_hosts, prev_best, prev_ids = uhosts[slots], best[slots], st.ids[first[slots]]
    final = prev_best + ms[prev_hosts, p.snk]  # (Hp,)
    total = float(final.min())
    if not math.isfinite(total):
        _raise_unreachable(p)
    j = int(_lowest_id((final == total)[:, None], prev_ids)[0])
    positions = []
    for chosen, pred in reversed(back):
        positions.append(int(chosen[j]))
        j = int(pred[j])
    return _route(p, positions[::-1], total)


def _layered_graph(p: _Problem) -> nx.DiGraph:
    """The explicit layered DAG: START, (stage, replica id) nodes, END; an edge for every finite pair."""
    ms = p.costs.ms
    g = nx.DiGraph()
    g.add_node(START)
    prev = [(START, p.src)]  # (node, host row)
    for s, st in enumerate(p.stages):
        cur = [((s, int(r)), int(h)) for r, h in zip(st.ids, st.hosts)]
        node = st.node.tolist()
        g.add_nodes_from(n for n, _ in cur)
        rows = ms[np.ix_([h for _, h in prev], st.hosts)].tolist()  # (Hp, k)
        g.add_weighted_edges_from(
            (a, b, w + c) for (a, _), row in zip(prev, rows) for (b, _), w, c in zip(cur, row, node)
            if math.isfinite(w + c))
        prev = cur
    g.add_node(END)
    g.add_weighted_edges_from((a, END, float(ms[h, p.snk])) for a, h in prev if math.isfinite(ms[h, p.snk]))
    return g


def _astar_heuristic(p: _Problem):  # noqa: ANN202 (returns a networkx heuristic)
    """Admissible (and consistent) A* heuristic: the cheapest node cost of every stage still ahead."""
    mins = [float(st.node.min()) for st in p.stages]
    ahead = [sum(mins[s + 1:]) for s in range(len(mins))]  # after stage s
    total = sum(mins)

    def h(u: object, _target: object) -> float:
        if u == START:
            return total
        if u == END:
            return 0.0
        return ahead[u[0]]  # type: ignore[index]

    return h


def _route_from_path(p: _Problem, path: list, cost: float) -> Route:
    pos = [int(np.searchsorted(st.ids, r)) for st, (_, r) in zip(p.stages, path[1:-1])]
    return _route(p, pos, cost)


def _plan_nx(p: _Problem, astar: bool, g: nx.DiGraph | None = None) -> Route:
    """networkx Dijkstra (or A*) from START to END over the explicit layered graph."""
    g = _layered_graph(p) if g is None else g
    try:
        if astar:
            path = nx.astar_path(g, START, END, heuristic=_astar_heuristic(p), weight="weight")
            cost = nx.path_weight(g, path, weight="weight")
        else:
            cost, path = nx.single_source_dijkstra(g, START, END, weight="weight")
    except nx.NetworkXNoPath:
        _raise_unreachable(p)
    return _route_from_path(p, path, cost)


def _plan_greedy(p: _Problem) -> Route:
    """At each stage the replica with the cheapest edge from the current one; not optimal."""
    ms, at, total, positions = p.costs.ms, p.src, 0.0, []
    for s, st in enumerate(p.stages):
        edge = ms[at, st.hosts] + st.node  # (k,)
        i = int(edge.argmin())  # ties: lowest replica id
        if not math.isfinite(edge[i]):
            _check_reachable(p)
            raise NoRouteError(f"greedy: stuck at stage {s} (no finite edge from {p.costs.hosts[at]!r}) although "
                               "a route exists: use method='dp'")
        total += float(edge[i])
        positions.append(i)
        at = int(st.hosts[i])
    back = float(ms[at, p.snk])
    if not math.isfinite(back):
        _check_reachable(p)
        raise NoRouteError(f"greedy: stuck at the sink ({p.costs.hosts[at]!r} cannot reach "
                           f"{p.costs.hosts[p.snk]!r}) although a route exists: use method='dp'")
    return _route(p, positions, total + back)


def _check_reachable(p: _Problem) -> None:
    """Raise NoReplicaError if no finite route exists at all (the DP decides)."""
    _plan_dp(p)


def _plan_brute(p: _Problem) -> Route:
    """Every combination of one live replica per stage (small cases only)."""
    n = math.prod(len(st.ids) for st in p.stages)
    if n > BRUTE_MAX_COMBINATIONS:
        raise PlannerError(f"method='brute': {n} combinations exceed {BRUTE_MAX_COMBINATIONS}: use method='dp'")
    ms = p.costs.ms
    best, best_pos = math.inf, None
    for pos in itertools.product(*(range(len(st.ids)) for st in p.stages)):  # lowest ids first
        at, total = p.src, 0.0
        for st, i in zip(p.stages, pos):
            total += ms[at, st.hosts[i]] + st.node[i]
            at = st.hosts[i]
        total += ms[at, p.snk]
        if total < best:
            best, best_pos = float(total), pos
    if best_pos is None:
        _raise_unreachable(p)
    return _route(p, best_pos, best)


def plan(replicas: Sequence[ReplicaState], num_stages: int, costs: HostCosts, source: str,
         sink: str | None = None, method: str = "dp") -> Route:
    """The cheapest route from `source` through one live replica of every stage to `sink` (default: source).

    Raises NoReplicaError (a stage has no live or reachable replica), TopologyError (unknown host),
    PlannerError (bad replica field), ValueError (unknown method).
    """
    if method not in METHODS:
        raise ValueError(f"unknown planner method {method!r}: choose one of {', '.join(METHODS)}")
    p = _prepare(replicas, num_stages, costs, source, sink)
    if method == "dp":
        return _plan_dp(p)
    if method == "dijkstra":
        return _plan_nx(p, astar=False)
    if method == "astar":
        return _plan_nx(p, astar=True)
    if method == "greedy":
        return _plan_greedy(p)
    return _plan_brute(p)


def route_cost(route: Route, replicas: Sequence[ReplicaState], costs: HostCosts, source: str,
               sink: str | None = None) -> float:
    """Recompute a route's cost from scratch (same cost model as `plan`)."""
    by_id = {(r.stage, r.replica): r for r in replicas}
    at, total = source, 0.0
    for s, rid in enumerate(route.replicas):
        r = by_id[(s, rid)]
        total += costs.cost(at, r.host) + r.node_cost
        at = r.host
    return total + costs.cost(at, source if sink is None else sink)


# ---------------------------------------------------------------------------------------------------
# Caching, logging, drawing


class RouteCache:
    """Re-plans only when the replicas changed enough; logs every new route once at INFO.

    A re-plan happens when the membership (stage, replica, host, alive) changed, the inputs
    (num_stages, source, sink, method, host costs) changed, or a live replica's node cost moved by
    more than `threshold` relatively and `min_change_ms` absolutely since the last plan.
    """

    def __init__(self, threshold: float = 0.1, min_change_ms: float = 1.0) -> None:
        self.threshold = threshold  # relative change of a node cost that triggers a re-plan
        self.min_change_ms = min_change_ms  # ... and it must move by more than this many ms
        self.plans = 0  # how many real plans ran
        self.route: Route | None = None  # the cached route
        self._key: tuple | None = None
        self._hosts: list[str] = []  # HostCosts of the last plan (compared by value: a rebuilt equal
        self._costs_ms: np.ndarray | None = None  # matrix does not re-plan; one changed in place does)
        self._node: dict[tuple[int, int], float] = {}

    def invalidate(self) -> None:
        """Forget the cached route: the next `get` plans."""
        self._key = None

    def get(self, replicas: Sequence[ReplicaState], num_stages: int, costs: HostCosts, source: str,
            sink: str | None = None, method: str = "dp") -> Route:
        """The cached route, or a new plan when something changed enough."""
        key = (frozenset((r.stage, r.replica, r.host, r.alive) for r in replicas), num_stages, source, sink, method)
        node = {(r.stage, r.replica): r.node_cost for r in replicas if r.alive}
        if (self.route is not None and key == self._key and self._same_costs(costs)
                and not self._moved(node)):
            return self.route
        self._key = None
        route = plan(replicas, num_stages, costs, source, sink, method)
        self.plans += 1
        if self.route is None or (route.replicas, route.hosts) != (self.route.replicas, self.route.hosts):
            log.info("route: %s", route.describe())
        self.route, self._key, self._node = route, key, node
        self._hosts, self._costs_ms = list(costs.hosts), costs.ms.copy()
        return route

    def _same_costs(self, costs: HostCosts) -> bool:
        return costs.hosts == self._hosts and np.array_equal(costs.ms, self._costs_ms)

    def _moved(self, node: dict[tuple[int, int], float]) -> bool:
        for k, new in node.items():
            old = self._node[k]
            if new == old:
                continue
            if not (math.isfinite(new) and math.isfinite(old)):
                # inf <-> finite (an unreachable replica came back, or went away): the relative test
                # below reads inf <= threshold * inf as "unchanged", and the cache would keep a far
                # costlier route for good; NaN lands here too and re-plans (plan names the field)
                return True
            delta = abs(new - old)
            if not (delta <= self.min_change_ms or delta <= self.threshold * abs(old)):
                return True
        return False


def route_to_mermaid(route: Route, replicas: Sequence[ReplicaState], num_stages: int, *,
                     source: str | None = None, sink: str | None = None, max_edges: int = 200) -> str:
    """A Mermaid `graph LR`: start/end, one subgraph per stage, the route thick (`==>`), dead replicas greyed.

    The other candidate edges are drawn dotted when there are at most `max_edges` of them.
    """
    def nid(s: int, r: int) -> str:
        return f"s{s}r{r}"

    def esc(text: str) -> str:
        return str(text).replace('"', "#quot;")

    by_stage: list[list[ReplicaState]] = [[] for _ in range(num_stages)]
    for r in replicas:
        if not 0 <= r.stage < num_stages:
            raise PlannerError(f"replica {r.replica!r} on {r.host!r}: stage={r.stage!r} is outside "
                               f"0..{num_stages - 1}")
        by_stage[r.stage].append(r)
    for rs in by_stage:
        rs.sort(key=lambda r: r.replica)
    lines = ["graph LR", f'  start(["start{"<br/>" + esc(source) if source else ""}"])']
    dead, chosen = [], [nid(s, r) for s, r in enumerate(route.replicas)]
    for s, rs in enumerate(by_stage):
        lines.append(f'  subgraph stage{s}["stage {s}"]')
        for r in rs:
            tag = " (dead)" if not r.alive else ""
            lines.append(f'    {nid(s, r.replica)}["replica {r.replica}{tag}<br/>{esc(r.host)}"]')
            if not r.alive:
                dead.append(nid(s, r.replica))
        lines.append("  end")
    lines.append(f'  finish(["end{"<br/>" + esc(sink or source) if (sink or source) else ""}"])')
    path = ["start", *chosen, "finish"]
    lines += [f"  {a} ==> {b}" for a, b in zip(path, path[1:])]
    on_route = set(zip(path, path[1:]))
    layers = [["start"], *([nid(s, r.replica) for r in rs if r.alive] for s, rs in enumerate(by_stage)), ["finish"]]
    others = [(a, b) for la, lb in zip(layers, layers[1:]) for a in la for b in lb if (a, b) not in on_route]
    if len(others) <= max_edges:
        lines += [f"  {a} -.-> {b}" for a, b in others]
    lines.append("  classDef chosen stroke-width:3px,stroke:#2a7")
    lines.append("  classDef dead fill:#eee,stroke:#999,stroke-dasharray:4 3,color:#999")
    lines.append(f"  class {','.join(chosen)} chosen")
    if dead:
        lines.append(f"  class {','.join(dead)} dead")
    return "\n".join(lines)
