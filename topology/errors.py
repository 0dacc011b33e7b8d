"""Typed errors of the topology layer (no models/ or actors/ here: actors/ turns them into ConfigError)."""

from __future__ import annotations


class TopologyError(ValueError):
    """A topology file, route request, layer split or placement is invalid (the message names the field)."""


class NoRouteError(TopologyError):
    """No path joins the two nodes."""


class SplitError(TopologyError):
    """Layers cannot be split or placed as asked: bad inputs, or no stage fits its memory."""
