"""meshpipe's Grafana dashboards for its `ray_meshpipe_*` series (actors/dashboard/grafana/*.json).

They follow the conventions of the dashboards Ray generates (ray/dashboard/modules/metrics): a
`datasource` variable of type prometheus that every panel and query names as "${datasource}", a
`SessionName` filter, schemaVersion 27; so they sit beside Ray's dashboards in the Grafana Ray's
provisioning sets up, on its Prometheus datasource. `meshpipe grafana` (`grafana_command`) copies
them into a folder, or into the running Ray session's dashboards folder, which that provisioning
loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.errors import ConfigError

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard" / "grafana"
DASHBOARDS: tuple[Path, ...] = (DASHBOARD_DIR / "meshpipe_serving.json", DASHBOARD_DIR / "meshpipe_training.json")

# Ray's dashboard process reads these (metrics_head.py): where it writes Grafana's config and dashboards
_DASHBOARDS_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
_METRICS_ROOT_ENV = "RAY_METRICS_OUTPUT_ROOT"

_SERIES = re.compile(r"\bray_meshpipe_\w+")


def load(path: str | Path) -> dict[str, Any]:
    """A dashboard's JSON."""
    return json.loads(Path(path).read_text())


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def panel_series(dashboard: dict[str, Any]) -> set[str]:
    """The `ray_meshpipe_*` series the panels' PromQL names (`_bucket`/`_count`/`_sum`/`_total` as written)."""
    return {name for panel in iter_panels(dashboard) for target in panel.get("targets", [])
            for name in _SERIES.findall(target.get("expr", ""))}


def variable_series(dashboard: dict[str, Any]) -> set[str]:
    """The `ray_meshpipe_*` series the templating variables' queries name (label_values(...))."""
    names: set[str] = set()
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query", "")
        names.update(_SERIES.findall(query.get("query", "") if isinstance(query, dict) else str(query)))
    return names


def write_dashboards(out: str | Path) -> list[Path]:
    """Copies the dashboards into `out` (created if missing); the files written."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [Path(shutil.copyfile(src, out / src.name)) for src in DASHBOARDS]
    except FileExistsError:
        raise ConfigError(f"{out} is a file: give a folder for the Grafana dashboards") from None
    except OSError as e:
        raise ConfigError(f"cannot write the Grafana dashboards to {out}: {e.strerror or e}") from None
    for path in written:
        log.info("wrote %s", path)
    return written


def _ray_temp_dir() -> Path:
    """Ray's default temp root (ray._common.utils.get_default_ray_temp_dir, without importing Ray)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray"


def _session_dir() -> Path | None:
    """The Ray session this process is connected to, else the newest one on this machine (session_latest)."""
    ray = sys.modules.get("ray")  # not imported: not initialised either
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        return Path(ctx.get_temp_dir()) / ctx.get_session_name()
    latest = _ray_temp_dir() / "session_latest"
    return latest.resolve() if latest.exists() else None


def _ray_grafana_root(session: Path) -> Path:
    root = os.environ.get(_METRICS_ROOT_ENV)
    return (Path(root) if root else session / "metrics") / "grafana"


def ray_dashboards_dir() -> Path | None:
    """The Grafana dashboards folder of the running Ray session (`<session>/metrics/grafana/dashboards`),
    which Ray's Grafana provisioning loads; None without a Ray session (not initialised, no session_latest).

    It may not exist: Ray's dashboard process writes it when it starts (not with include_dashboard=False).
    """
    override = os.environ.get(_DASHBOARDS_DIR_ENV)
    if override:
        return Path(override)
    session = _session_dir()
    return None if session is None else _ray_grafana_root(session) / "dashboards"


def _viewing_lines() -> list[str]:
    prometheus = ("Prometheus must scrape Ray: `ray metrics launch-prometheus` on the head node, or your own with "
                  "<session>/prom_metrics_service_discovery.json as a file_sd_config. The dashboards query the "
                  "datasource picked in their `datasource` variable (Ray's provisioned Prometheus by default).")
    metrics_view = ("Ray dashboard's Metrics view: start the head with RAY_GRAFANA_HOST=http://<grafana>:3000 and "
                    "RAY_PROMETHEUS_HOST=http://<prometheus>:9090 set (RAY_GRAFANA_IFRAME_HOST too if browsers "
                    "reach Grafana at another address); it embeds Ray's own dashboards, and its 'View in Grafana' "
                    "link opens Grafana, where 'meshpipe Serving' and 'meshpipe Training' are listed (tag meshpipe).")
    return [prometheus, metrics_view]


def grafana_command(out: Path | None = None, ray_dir: bool = False) -> str:
    """`meshpipe grafana`: writes the dashboards to `out`, or (`ray_dir`) into the running Ray session's
    Grafana dashboards folder; returns what to do next, a few lines of text."""
    if (out is None) == (not ray_dir):
        raise ConfigError("give either --out DIR (a folder to write the dashboards to) or --ray-dir (the "
                          "running Ray session's Grafana dashboards folder)")
    if ray_dir:
        dest = ray_dashboards_dir()
        if dest is None:
            raise ConfigError(f"no Ray session on this machine (nothing in {_ray_temp_dir()}): start Ray "
                              "(`ray start --head`) on this node first, or use --out DIR")
        session = _session_dir()
        grafana = _ray_grafana_root(session) if session is not None else dest.parent
        # Ray's dashboard process writes Grafana's config when it starts (not with include_dashboard=False)
        provisioned = (grafana / "provisioning" / "dashboards").is_dir()
        written = write_dashboards(dest)
        lines = [f"wrote {', '.join(p.name for p in written)} into Ray's Grafana dashboards folder {dest}"]
        if provisioned:
            lines.append(
                f"Ray's Grafana provisioning ({grafana / 'provisioning' / 'dashboards'}) loads every JSON there "
                "into Grafana's 'Ray' folder, beside Ray's dashboards: start Grafana with `grafana-server "
                f"--config {grafana / 'grafana.ini'} web` (a running one finds new files within ~10 s). "
                "The folder belongs to this session: after a new `ray start`, run `meshpipe grafana --ray-dir` "
                "again and restart Grafana.")
        else:
            lines.append(
                "Ray wrote no Grafana config in this session (started without its dashboard?), so nothing "
                "provisions this folder: start Ray with the dashboard (`ray start --head`), or import the "
                "files into Grafana (Dashboards > New > Import).")
    else:
        assert out is not None
        written = write_dashboards(out)
        folder = written[0].parent.resolve()
        provider = f"providers: [{{name: meshpipe, type: file, options: {{path: {folder}}}}}]"
        grafana_line = (f"Grafana: import them (Dashboards > New > Import), or load the folder with a file provider "
                        f"(provisioning/dashboards/meshpipe.yml: {provider}); `meshpipe grafana --ray-dir` on the "
                        "head node puts them where Ray's own Grafana provisioning looks.")
        lines = [f"wrote {', '.join(p.name for p in written)} to {folder}", grafana_line]
    return "\n".join(lines + _viewing_lines())
