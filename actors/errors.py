"""Typed errors of the Ray side. Every one is a `models.MeshpipeError`."""

from __future__ import annotations

from models.errors import MeshpipeError


class BackPressureError(MeshpipeError, RuntimeError):
    """The pipeline is full (active sequences, queue or KV budget): retry later (HTTP 429)."""


class RequestTimeoutError(MeshpipeError, TimeoutError):
    """A request ran past its `timeout_s`; its KV caches were freed."""


class RequestCancelledError(MeshpipeError, RuntimeError):
    """The request was cancelled before it finished; its KV caches were freed."""


class StageFailedError(MeshpipeError, RuntimeError):
    """A stage actor failed while serving the request; the message names the stage."""


class DeploymentError(MeshpipeError, RuntimeError):
    """A deployment cannot be created, found or placed (the message says which and why)."""


class InsufficientResourcesError(DeploymentError):
    """The cluster has fewer GPUs (or other resources) than the stages ask for, and none can be added."""
