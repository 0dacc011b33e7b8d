"""The import rule between the three packages, read from the source (ast), and the file-size limits.

models/ imports neither topology/ nor actors/; topology/ imports neither models/ nor actors/; only
actors/ imports ray. Imports inside functions and under TYPE_CHECKING count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "topology", "actors")
FORBIDDEN = {  # package -> top-level modules it must not import
    "models": {"topology", "actors", "ray"},
    "topology": {"models", "actors", "ray"},
    "actors": set(),
}
MAX_LINES = 700  # every .py file of the three packages
ROUTER_MAX_LINES = 500  # actors/router.py, once split


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported(source: str, package: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in `source`, at any depth (relative: `package`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return sorted(found)


def broken_rules() -> list[str]:
    """`file:line imports X` for every import the rule forbids."""
    broken = []
    for path in sources():
        package = path.relative_to(ROOT).parts[0]
        broken += [f"{path.relative_to(ROOT)}:{line} imports {module}"
                   for line, module in imported(path.read_text(), package) if module in FORBIDDEN[package]]
    return broken


def test_the_three_packages_are_found() -> None:
    assert {p.relative_to(ROOT).parts[0] for p in sources()} == set(PACKAGES)


def test_import_rule() -> None:
    assert broken_rules() == []


def test_imports_inside_functions_count() -> None:
    source = ("import torch\nfrom . import cache\n\ndef f():\n    from topology.graph import Topology\n"
              "    if True:\n        import ray.util\n")
    assert imported(source, "models") == [(1, "torch"), (2, "models"), (5, "topology"), (7, "ray")]


def line_counts() -> dict[str, int]:
    return {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sources()}


def test_no_file_over_700_lines() -> None:
    assert {f: n for f, n in line_counts().items() if n > MAX_LINES and f != "actors/router.py"} == {}


def test_router_at_most_500_lines() -> None:
    assert line_counts()["actors/router.py"] <= ROUTER_MAX_LINES


def test_the_message_layer_has_no_ray() -> None:
    wire = [p for p in sources() if p.relative_to(ROOT).parts[:2] == ("actors", "wire")]
    assert wire
    assert [f"{p.relative_to(ROOT)}:{line}" for p in wire for line, module in imported(p.read_text(), "actors")
            if module == "ray"] == []


def test_no_file_cites_a_document_outside_the_project() -> None:
    """README carries what users need: no file points at a design document the repository lacks."""
    files = [p for pattern in ("*.py", "*.md", "*.ipynb", "*.yaml", "*.toml") for p in ROOT.rglob(pattern)
             if ".git" not in p.parts and "site-packages" not in p.parts]
    marker = "DESIGN" + ".md"
    assert [str(p.relative_to(ROOT)) for p in files if marker in p.read_text(errors="replace")] == []


def test_a_stage_process_imports_only_what_it_runs() -> None:
    """A deployment starts one process per stage: they load the stage's code, not the driver's side
    (the planner and networkx, the pipeline facade, the router, Serve, the trainer)."""
    import subprocess
    import sys

    probe = ("import sys, actors.stage, actors.ring_stage, actors.train_stage\n"
             "print(sorted(m for m in ('networkx', 'topology.graph', 'topology.planner', 'actors.pipeline', "
             "'actors.router', 'actors.trainer', 'ray.serve') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


def test_the_public_names_resolve_and_an_unknown_one_is_an_attribute_error() -> None:
    import pytest

    import actors
    import topology

    for package in (actors, topology):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name).__name__ == name
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope  # noqa: B018


def test_the_cli_starts_without_torch_or_ray() -> None:
    """`meshpipe --help` and a bad argument answer in a fraction of a second: the CLI's modules, the
    model layer's names and its sources import neither torch (~1.3 s here) nor Ray until a command needs them."""
    import subprocess
    import sys

    code = ("import sys, actors.cli, models\nfrom models import ConfigError, MeshpipeError\n"
            "from models.sources import resolve_source\nprint(sorted({'torch', 'ray'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


def test_every_lazy_model_name_is_public_and_loads() -> None:
    import models

    assert sorted(models.__all__) == sorted([*models._WHERE, "load_model"])
    for name in models.__all__:
        assert getattr(models, name) is not None
