"""Topology YAML, link costs and host-to-host routes (pure code, no Ray)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import yaml

from topology import NoRouteError, Topology, TopologyError, transfer_ms

EXAMPLE = {
    "nodes": {"A": {"gpus": 1, "gpu_memory_gb": 24, "tflops": 80}, "B": {}, "C": {"gpus": 2}, "D": None},
    "links": [
        {"a": "A", "b": "B", "latency_ms": 10, "bandwidth_gbps": 25},
        {"a": "A", "b": "C", "latency_ms": 1, "bandwidth_gbps": 1},
        {"a": "C", "b": "B", "latency_ms": 1, "bandwidth_gbps": 1},
        {"a": "B", "b": "D", "latency_ms": 2, "directed": True},
    ],
}


def test_link_cost_formula_is_designs() -> None:
    assert transfer_ms(10, 25, 0) == 10
    assert transfer_ms(10, 25, 25e9 / 8) == pytest.approx(1010)  # 1 s of a 25 Gb/s link
    assert transfer_ms(3, None, 1e12) == 3  # no bandwidth: latency only


def test_the_cheapest_path_depends_on_the_message_size() -> None:
    topo = Topology.from_dict(EXAMPLE)
    assert topo.route("A", "B", 0) == (["A", "C", "B"], 2.0)  # small: two 1 ms hops beat 10 ms
    path, cost = topo.route("A", "B", 10e6)  # 10 MB: the 25 Gb/s link wins
    assert path == ["A", "B"] and cost == pytest.approx(10 + 10e6 * 8 / 25e9 * 1000)


def test_directed_links_go_one_way() -> None:
    topo = Topology.from_dict(EXAMPLE)
    assert topo.route("A", "D")[0][-2:] == ["B", "D"]
    with pytest.raises(NoRouteError, match="no path from 'D' to 'A'"):
        topo.route("D", "A")


def test_route_is_optimal_against_brute_force_on_random_graphs() -> None:
    import random

    rng = random.Random(0)
    for trial in range(50):
        names = [f"h{i}" for i in range(6)]
        links = [{"a": a, "b": b, "latency_ms": rng.uniform(0, 20), "bandwidth_gbps": rng.choice([None, 1, 10, 100])}
                 for a, b in itertools.combinations(names, 2) if rng.random() < 0.5]
        topo = Topology.from_dict({"nodes": {n: {} for n in names}, "links": links})
        nbytes = rng.choice([0, 1e5, 1e8])
        try:
            _, cost = topo.route("h0", "h5", nbytes)
        except NoRouteError:
            assert not nx.has_path(topo.graph, "h0", "h5")
            continue
        best = min(sum(topo.link_cost_ms(a, b, nbytes) for a, b in zip(p, p[1:]))
                   for p in nx.all_simple_paths(topo.graph, "h0", "h5"))
        assert cost == pytest.approx(best), trial


@pytest.mark.parametrize("data,match", [
    ({"nodes": {"A": {}}, "links": [{"a": "A", "b": "Z"}]}, r"links\[0\]\.b: unknown node 'Z'"),
    ({"nodes": {"A": {}, "B": {}}, "links": [{"a": "A", "b": "B", "latency_ms": -1}]}, r"links\.0\.latency_ms"),
    ({"nodes": {"A": {}, "B": {}}, "links": [{"a": "A", "b": "B", "bandwidth_gbps": 0}]}, "bandwidth_gbps"),
    ({"nodes": {"A": {"gpus": -2}}}, r"nodes\.A\.NodeSpec\.gpus|nodes\.A"),
    ({"nodes": {"A": {}}, "links": [{"a": "A", "b": "A", "latency": 3}]}, "latency"),
    ({"nodez": {}}, "nodez"),
    ({"nodes": {"A": {}, "B": {}}, "links": [{"a": "A", "b": "B", "latency_ms": float("inf")}]}, "finite number"),
    ({"nodes": {"A": {}, "B": {}}, "links": [{"a": "A", "b": "B", "bandwidth_gbps": float("nan")}]}, "finite"),
])
def test_bad_topologies_name_the_field(data: dict, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        Topology.from_dict(data)


def test_missing_file_and_unknown_endpoints(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        Topology.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("nodes: [unclosed")
    with pytest.raises(TopologyError, match="not valid YAML"):
        Topology.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "latin1.yaml").write_bytes("nodes: {caf\xe9: {}}".encode("latin-1"))
    with pytest.raises(TopologyError, match="not UTF-8 text"):
        Topology.from_yaml(tmp_path / "latin1.yaml")
    with pytest.raises(TopologyError, match="--from: unknown node 'X'"):
        Topology.from_dict(EXAMPLE).route("X", "A")


def test_mermaid_export_draws_nodes_links_and_the_route() -> None:
    topo = Topology.from_dict(EXAMPLE)
    text = topo.to_mermaid(highlight=["A", "C", "B"])
    assert text.startswith("graph LR") and '"A<br/>1 GPU"' in text and "25 Gb/s" in text
    assert text.count("==>") == 2 and "-->" in text  # the route thick, the directed link an arrow


def test_cli_route_json(tmp_path: Path) -> None:
    f = tmp_path / "topo.yaml"
    f.write_text(yaml.safe_dump(EXAMPLE))
    cmd = [sys.executable, "-m", "actors.cli", "route", str(f), "--from", "A", "--to", "B", "--bytes", "1e7", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["path"] == ["A", "B"] and got["cost_ms"] == pytest.approx(13.2)
    bad = subprocess.run([*cmd[:6], "Z", *cmd[7:]], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --from: unknown node 'Z'")
