"""The cluster as a graph and the routes through it (no actors here)."""

from topology.graph import NoRouteError, Topology, TopologyError, transfer_ms

__all__ = ["NoRouteError", "Topology", "TopologyError", "transfer_ms"]
