"""The Ray side of meshpipe: stage and router actors, the message envelope, the `Pipeline` facade."""

from actors.errors import (
    BackPressureError,
    DeploymentError,
    InsufficientResourcesError,
    RequestCancelledError,
    RequestTimeoutError,
    StageFailedError,
)
from actors.config import DeployConfig
from actors.pipeline import Pipeline, StreamChunk
from actors.progress import DeployProgress, TqdmProgress
from actors.trainer import PipelineTrainer, StepResult

__all__ = [
    "BackPressureError", "DeployConfig", "DeployProgress", "DeploymentError", "InsufficientResourcesError", "Pipeline",
    "PipelineTrainer", "RequestCancelledError", "RequestTimeoutError", "StageFailedError", "StepResult", "StreamChunk",
    "TqdmProgress",
]
