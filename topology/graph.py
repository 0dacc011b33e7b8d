"""The cluster as a graph: hosts/GPUs as nodes, links weighted by latency and bandwidth.

Loaded from YAML (README: Topology YAML). Cost of sending N bytes over a link, in ms:
`latency_ms + N * 8 / (bandwidth_gbps * 1e9) * 1000` (no bandwidth: latency only); a path's cost
is the sum over its links. networkx does host-to-host shortest paths. Starts no actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from topology.errors import NoRouteError, TopologyError


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(0, ge=0)  # GPUs on this host
    gpu_memory_gb: float = Field(0.0, ge=0)  # memory of each GPU
    tflops: float = Field(0.0, ge=0)  # measured or nominal speed of each GPU


class LinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: str
    b: str
    latency_ms: float = Field(0.0, ge=0, allow_inf_nan=False)  # one-way latency
    bandwidth_gbps: float | None = Field(None, gt=0, allow_inf_nan=False)  # gigabits per second; None = latency only
    directed: bool = False  # a -> b only
    trusted: bool = True  # False: encrypt messages on this link (messages issue)


# GPUs of a whole topology: `gpus_from_topology` lists each one, so a forged count (`gpus: 1000000000`)
# would be a list of a billion before any placement starts.
MAX_GPUS = 1 << 16


class TopologySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: dict[str, NodeSpec | None] = Field(default_factory=dict)
    links: list[LinkSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _links_name_known_nodes(self) -> TopologySpec:
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in self.nodes:
                    raise ValueError(f"links[{i}].{end}: unknown node {getattr(link, end)!r} "
                                     f"(nodes are {sorted(self.nodes)})")
        total = sum(node.gpus for node in self.nodes.values() if node is not None)
        if total > MAX_GPUS:
            raise ValueError(f"nodes: {total} GPUs in all is more than the {MAX_GPUS} meshpipe places on: "
                             "check each node's gpus count")
        return self


def transfer_ms(latency_ms: float, bandwidth_gbps: float | None, nbytes: float) -> float:
    """The link cost for a message of `nbytes`."""
    if bandwidth_gbps is None:
        return latency_ms
    return latency_ms + nbytes * 8 / (bandwidth_gbps * 1e9) * 1000


def cheapest(edge: dict[str, Any], nbytes: float) -> dict[str, Any]:
    """Of an edge's parallel links (two networks between two hosts, a directed and an undirected link),
    the cheapest for a message of `nbytes` (a small message may prefer latency, a large one bandwidth)."""
    return min(edge["links"], key=lambda lk: transfer_ms(lk["latency_ms"], lk["bandwidth_gbps"], nbytes))


def edge_ms(edge: dict[str, Any], nbytes: float) -> float:
    lk = cheapest(edge, nbytes)
    return transfer_ms(lk["latency_ms"], lk["bandwidth_gbps"], nbytes)


class Topology:
    """A directed networkx graph; an undirected link is two edges. Parallel links between two hosts are
    all kept on their edge (`links`), and each query takes, per direction, the cheapest for its message
    size; the edge's own latency/bandwidth/trusted are its cheapest link's for an empty message."""

    def __init__(self, spec: TopologySpec) -> None:
        self.spec = spec
        self.graph = nx.DiGraph()
        for name, node in spec.nodes.items():
            self.graph.add_node(name, **(node or NodeSpec()).model_dump())
        for link in spec.links:
            attrs = {"latency_ms": link.latency_ms, "bandwidth_gbps": link.bandwidth_gbps, "trusted": link.trusted}
            for u, v in [(link.a, link.b)] + ([] if link.directed else [(link.b, link.a)]):
                if self.graph.has_edge(u, v):
                    self.graph.edges[u, v]["links"].append(attrs)
                    self.graph.edges[u, v].update(cheapest(self.graph.edges[u, v], 0))
                else:
                    self.graph.add_edge(u, v, links=[attrs], **attrs)

    def link(self, a: str, b: str, nbytes: float = 0) -> dict[str, Any]:
        """The link a message of `nbytes` takes from host `a` to its neighbour `b` (latency_ms,
        bandwidth_gbps, trusted)."""
        return cheapest(self.graph.edges[a, b], nbytes)

    @classmethod
    def from_dict(cls, data: Any, where: str = "topology") -> Topology:
        try:
            return cls(TopologySpec.model_validate(data if data is not None else {}))
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'top level'}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
            raise TopologyError(f"{where}: {problems}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Topology:
        path = Path(path)
        if not path.is_file():
            raise TopologyError(f"topology file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise TopologyError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise TopologyError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
        except RecursionError:  # PyYAML composes nested lists and maps recursively
            raise TopologyError(f"{path}: YAML nested too deeply to be a topology") from None
        return cls.from_dict(data, where=str(path))

    def link_cost_ms(self, a: str, b: str, nbytes: float = 0) -> float:
        return edge_ms(self.graph.edges[a, b], nbytes)

    def route(self, src: str, dst: str, nbytes: float = 0) -> tuple[list[str], float]:
        """The cheapest path from `src` to `dst` for a message of `nbytes`, and its cost in ms."""
        for end, name in (("--from", src), ("--to", dst)):
            if name not in self.graph:
                raise TopologyError(f"{end}: unknown node {name!r} (nodes are {sorted(self.graph)})")

        def weight(a: str, b: str, e: dict) -> float:
            return edge_ms(e, nbytes)

        try:
            cost, path = nx.single_source_dijkstra(self.graph, src, dst, weight=weight)
        except nx.NetworkXNoPath:
            raise NoRouteError(f"no path from {src!r} to {dst!r}: add a link that joins them") from None
        return path, float(cost)

    def transfer_matrix(self, nbytes: float = 0) -> tuple[list[str], np.ndarray]:
        """All-pairs cheapest transfer times for a message of `nbytes`: (hosts, (H, H) ms).

        `ms[i, j]` is the cost of `route(hosts[i], hosts[j], nbytes)`; 0 on the diagonal, inf where no
        path joins them (networkx Dijkstra from every node).
        """
        hosts = list(self.graph)
        index = {h: i for i, h in enumerate(hosts)}
        ms = np.full((len(hosts), len(hosts)), np.inf)  # (H, H)

        def weight(a: str, b: str, e: dict) -> float:
            return edge_ms(e, nbytes)

        for src, dist in nx.all_pairs_dijkstra_path_length(self.graph, weight=weight):
            row = ms[index[src]]
            for dst, d in dist.items():
                row[index[dst]] = d
        np.fill_diagonal(ms, 0.0)
        return hosts, ms

    def to_mermaid(self, highlight: list[str] | None = None) -> str:
        """A Mermaid flowchart of the hosts and links (a highlighted path drawn thick)."""
        ids = {n: f"n{i}" for i, n in enumerate(self.graph)}
        lines = ["graph LR"]
        for n, d in self.graph.nodes(data=True):
            gpus = f"<br/>{d['gpus']} GPU" if d.get("gpus") else ""
            lines.append(f'  {ids[n]}["{n}{gpus}"]')
        on_path = set(zip(highlight or [], (highlight or [])[1:]))
        seen = set()
        for a, b, d in self.graph.edges(data=True):
            if (b, a) in seen and not ({(a, b), (b, a)} & on_path):
                continue
            seen.add((a, b))
            bw = f", {d['bandwidth_gbps']:g} Gb/s" if d["bandwidth_gbps"] else ""
            arrow = "==>" if (a, b) in on_path else "---" if self.graph.has_edge(b, a) else "-->"
            lines.append(f'  {ids[a]} {arrow}|"{d["latency_ms"]:g} ms{bw}"| {ids[b]}')
        return "\n".join(lines)
