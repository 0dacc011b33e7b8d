"""The Ray side of meshpipe: stage and router actors, the message envelope, the `Pipeline` facade.

The public names load on first use (PEP 562), so a stage actor's process imports what it runs and
not the driver's side (planner, networkx, Serve, the trainer): each of a deployment's actor
processes starts faster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "BackPressureError": "actors.errors", "DeploymentError": "actors.errors",
    "InsufficientResourcesError": "actors.errors", "RequestCancelledError": "actors.errors",
    "RequestTimeoutError": "actors.errors", "StageFailedError": "actors.errors",
    "DeployConfig": "actors.config", "Pipeline": "actors.pipeline", "StreamChunk": "actors.pipeline",
    "DeployProgress": "actors.progress", "TqdmProgress": "actors.progress",
    "PipelineTrainer": "actors.trainer", "StepResult": "actors.trainer",
}
__all__ = [
    "BackPressureError", "DeployConfig", "DeployProgress", "DeploymentError", "InsufficientResourcesError", "Pipeline",
    "PipelineTrainer", "RequestCancelledError", "RequestTimeoutError", "StageFailedError", "StepResult", "StreamChunk",
    "TqdmProgress",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from actors.config import DeployConfig
    from actors.errors import (
        BackPressureError,
        DeploymentError,
        InsufficientResourcesError,
        RequestCancelledError,
        RequestTimeoutError,
        StageFailedError,
    )
    from actors.pipeline import Pipeline, StreamChunk
    from actors.progress import DeployProgress, TqdmProgress
    from actors.trainer import PipelineTrainer, StepResult
