"""The shipped Grafana dashboards: valid dashboard JSON in Ray's conventions, and every query names a
series actors/metrics.py really defines (read from its source, not from the dashboards' own module)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from actors.grafana import (
    DASHBOARDS,
    grafana_command,
    iter_panels,
    panel_series,
    ray_dashboards_dir,
    variable_series,
    write_dashboards,
)
from models.errors import ConfigError

METRICS_PY = Path(__file__).resolve().parents[2] / "actors" / "metrics.py"
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_count", "_sum")}
FILTER = 'deployment=~"$deployment"'


def defined_metrics() -> dict[str, str]:
    """meshpipe metric name -> Counter / Gauge / Histogram, from the Counter/Gauge/Histogram("meshpipe_...")
    calls in actors/metrics.py. An f-string name inside a comprehension over `self.<dict>` (the speculative
    and prefix counters) expands to that dict literal's keys."""
    tree = ast.parse(METRICS_PY.read_text())
    dicts: dict[str, list[str]] = {}  # self.<attr> = {"key": ...} literals
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for t in node.targets:
                if isinstance(t, ast.Attribute):
                    dicts[t.attr] = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    loops: dict[int, tuple[str, list[str]]] = {}  # id(call) -> (loop variable, its values)
    for node in ast.walk(tree):
        if isinstance(node, (ast.DictComp, ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            gen = node.generators[0]
            if isinstance(gen.iter, ast.Attribute) and isinstance(gen.target, ast.Name):
                for inner in ast.walk(node):
                    loops[id(inner)] = (gen.target.id, dicts[gen.iter.attr])
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES
                and node.args):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant):
            names = [arg.value]
        else:
            assert isinstance(arg, ast.JoinedStr) and id(node) in loops, ast.dump(arg)
            var, values = loops[id(node)]
            template = "".join(p.value if isinstance(p, ast.Constant) else f"<{p.value.id}>" for p in arg.values)
            names = [template.replace(f"<{var}>", v) for v in values]
        for name in names:
            assert name.startswith("meshpipe_"), name
            out[name] = node.func.id
    return out


def exported_series() -> dict[str, str]:
    """Prometheus series name (as Ray exports it: ray_ prefix, _total / _bucket...) -> meshpipe metric."""
    return {f"ray_{name}{sfx}": name for name, kind in defined_metrics().items() for sfx in SUFFIXES[kind]}


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.stem)
def dashboard(request: pytest.FixtureRequest) -> dict:
    return json.loads(request.param.read_text())


def _balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', '""', expr):  # brackets inside label values do not count
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def test_the_metrics_source_parses_into_the_known_kinds() -> None:
    defined = defined_metrics()
    assert defined["meshpipe_tokens_generated"] == "Counter"
    assert defined["meshpipe_stage_step_latency_ms"] == "Histogram"
    assert defined["meshpipe_kv_blocks_free"] == "Gauge"
    assert {"meshpipe_speculative_accepted", "meshpipe_prefix_hit_tokens", "meshpipe_train_loss"} <= set(defined)


def test_dashboards_are_valid_grafana_json_in_rays_conventions(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "meshpipe" in dashboard["tags"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("SessionName", "deployment"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == "${datasource}"
        assert v["query"]["query"].startswith("label_values(") and v["query"]["query"].endswith(f", {name})")
    panels = list(iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for p in panels:
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos) and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p["datasource"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_query_names_defined_series_of_the_selected_deployments(dashboard: dict) -> None:
    exported = exported_series()
    for p in iter_panels(dashboard):
        for t in p.get("targets", []):
            expr = t["expr"]
            assert expr.strip() and _balanced(expr), (p["title"], expr)
            named = panel_series({"panels": [{"targets": [t]}]})
            assert named, (p["title"], expr)
            assert named <= set(exported), (p["title"], named - set(exported))
            for selector in re.findall(r"\bray_meshpipe_\w+(\{[^}]*\})?", expr):
                assert FILTER in selector, (p["title"], expr)
    assert variable_series(dashboard) <= set(exported)


def test_every_defined_metric_has_a_panel() -> None:
    """A metric added to actors/metrics.py needs a panel in actors/dashboard/grafana/ (or this fails)."""
    named = set().union(*(panel_series(json.loads(p.read_text())) for p in DASHBOARDS))
    covered = {meshpipe for series, meshpipe in exported_series().items() if series in named}
    assert covered == set(defined_metrics()), set(defined_metrics()) - covered


def test_write_dashboards_copies_both_into_a_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    written = write_dashboards(out)
    assert sorted(p.name for p in written) == ["meshpipe_serving.json", "meshpipe_training.json"]
    for src in DASHBOARDS:
        assert (out / src.name).read_bytes() == src.read_bytes()
    assert write_dashboards(str(out)) == written  # again: overwritten, same files
    with pytest.raises(ConfigError, match="is a file"):
        write_dashboards(out / "meshpipe_serving.json")


def test_grafana_command_writes_to_out_and_says_how_to_use_them(tmp_path: Path) -> None:
    text = grafana_command(tmp_path / "dash", ray_dir=False)
    assert (tmp_path / "dash" / "meshpipe_training.json").is_file()
    assert str((tmp_path / "dash").resolve()) in text
    assert "RAY_GRAFANA_HOST" in text and "RAY_PROMETHEUS_HOST" in text
    with pytest.raises(ConfigError, match="--out"):
        grafana_command(None, ray_dir=False)
    with pytest.raises(ConfigError, match="--out"):
        grafana_command(tmp_path, ray_dir=True)


def test_ray_dashboards_dir_follows_session_latest_and_rays_overrides(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # as in a process that never imported Ray (a whole-suite run has the integration tests' Ray up)
    monkeypatch.setitem(sys.modules, "ray", None)
    for var in ("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", "RAY_METRICS_OUTPUT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_dashboards_dir() is None
    with pytest.raises(ConfigError, match="no Ray session"):
        grafana_command(None, ray_dir=True)

    session = tmp_path / "ray" / "session_2030-01-01_00-00-00_000000_1"
    (session / "metrics" / "grafana" / "provisioning" / "dashboards").mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    assert ray_dashboards_dir() == session.resolve() / "metrics" / "grafana" / "dashboards"
    text = grafana_command(None, ray_dir=True)
    assert (session / "metrics" / "grafana" / "dashboards" / "meshpipe_serving.json").is_file()
    assert "grafana.ini" in text and "provisioning" in text

    monkeypatch.setenv("RAY_METRICS_OUTPUT_ROOT", str(tmp_path / "root"))
    assert ray_dashboards_dir() == tmp_path / "root" / "grafana" / "dashboards"
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path / "exact"))
    assert ray_dashboards_dir() == tmp_path / "exact"
