"""Parallel links (two networks between one pair of hosts, a directed beside an undirected link): every
link is kept, and each query takes per direction the cheapest for its message size (against networkx on
a MultiDiGraph of the same links, on random topologies)."""

from __future__ import annotations

import random

import networkx as nx
import pytest

from topology.graph import Topology, transfer_ms


def _random_spec(rng: random.Random) -> dict:
    nodes = [f"h{i}" for i in range(rng.randint(2, 7))]
    links = []
    for _ in range(rng.randint(1, 16)):
        a, b = rng.sample(nodes, 2)
        links.append({"a": a, "b": b, "latency_ms": rng.choice([0.1, 1.0, 5.0, 20.0]),
                      "bandwidth_gbps": rng.choice([None, 1.0, 10.0, 100.0]), "directed": rng.random() < 0.4,
                      "trusted": rng.random() < 0.7})
    return {"nodes": {n: {} for n in nodes}, "links": links}


def _reference(spec: dict, nbytes: float) -> nx.MultiDiGraph:
    g = nx.MultiDiGraph()
    g.add_nodes_from(spec["nodes"])
    for lk in spec["links"]:
        w = transfer_ms(lk["latency_ms"], lk["bandwidth_gbps"], nbytes)
        g.add_edge(lk["a"], lk["b"], weight=w)
        if not lk["directed"]:
            g.add_edge(lk["b"], lk["a"], weight=w)
    return g


@pytest.mark.parametrize("seed", range(40))
def test_routes_equal_networkx_on_every_parallel_link(seed: int) -> None:
    rng = random.Random(seed)
    spec = _random_spec(rng)
    topo = Topology.from_dict(spec)
    for nbytes in (0, 4096, 10**8):
        ref = _reference(spec, nbytes)
        hosts, ms = topo.transfer_matrix(nbytes)
        for i, a in enumerate(hosts):
            lengths = nx.single_source_dijkstra_path_length(ref, a, weight="weight")
            for j, b in enumerate(hosts):
                want = 0.0 if a == b else lengths.get(b, float("inf"))
                assert ms[i, j] == pytest.approx(want)
                if a != b and want < float("inf"):
                    assert topo.route(a, b, nbytes)[1] == pytest.approx(want)


def test_a_small_message_takes_the_fast_link_and_a_large_one_the_wide_link() -> None:
    topo = Topology.from_dict({"nodes": {"A": {}, "B": {}}, "links": [
        {"a": "A", "b": "B", "latency_ms": 0.1, "bandwidth_gbps": 1.0},  # low latency, narrow
        {"a": "A", "b": "B", "latency_ms": 5.0, "bandwidth_gbps": 400.0, "trusted": False},  # wide, untrusted
        {"a": "B", "b": "A", "latency_ms": 0.01, "directed": True}]})
    assert topo.link("A", "B", 100)["latency_ms"] == 0.1
    assert topo.link("A", "B", 10**9)["bandwidth_gbps"] == 400.0 and not topo.link("A", "B", 10**9)["trusted"]
    assert topo.route("B", "A", 10**9)[1] == pytest.approx(0.01)  # the directed link, B -> A only
    assert topo.route("A", "B", 10**9)[1] == pytest.approx(transfer_ms(5.0, 400.0, 10**9))
