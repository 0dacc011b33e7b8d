"""Typed errors of the Ray side. Every one is a `models.MeshpipeError`.

topology/ raises its own `TopologyError`s; where actors/ calls it, `topology_errors()` turns them into
the user-facing `ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from models.errors import ConfigError, MeshpipeError
from topology.errors import NoRouteError, TopologyError


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


class TopologyConfigError(ConfigError, TopologyError):
    """A topology, split or placement error as the public API raises it: a ConfigError and a TopologyError."""


class NoRouteConfigError(TopologyConfigError, NoRouteError):
    """No path joins two nodes of the topology, as the public API raises it."""


def config_error(e: TopologyError) -> TopologyConfigError:
    """The user-facing ConfigError for an error of topology/ (same message; still a TopologyError)."""
    if isinstance(e, TopologyConfigError):
        return e
    return (NoRouteConfigError if isinstance(e, NoRouteError) else TopologyConfigError)(str(e))


@contextmanager
def topology_errors() -> Iterator[None]:
    """Calls into topology/ inside this raise ConfigError (`config_error`) instead of TopologyError."""
    try:
        yield
    except TopologyConfigError:
        raise
    except TopologyError as e:
        raise config_error(e) from e
