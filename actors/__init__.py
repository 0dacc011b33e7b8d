"""The Ray side of meshpipe: stage and router actors, the message envelope, the `Pipeline` facade.

The public names load on first use (PEP 562), so a stage actor's process imports what it runs and
not the driver's side (planner, networkx, Serve, the trainer): each of a deployment's actor
processes starts faster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topology.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(globals(), _WHERE)

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
