"""The cluster as a graph and the routes through it (no actors here)."""

from topology.graph import NoRouteError, Topology, TopologyError, transfer_ms
from topology.planner import (
    HostCosts,
    NoReplicaError,
    PlannerError,
    ReplicaState,
    Route,
    RouteCache,
    plan,
    route_cost,
    route_to_mermaid,
)

__all__ = [
    "HostCosts",
    "NoReplicaError",
    "NoRouteError",
    "PlannerError",
    "ReplicaState",
    "Route",
    "RouteCache",
    "Topology",
    "TopologyError",
    "plan",
    "route_cost",
    "route_to_mermaid",
    "transfer_ms",
]
