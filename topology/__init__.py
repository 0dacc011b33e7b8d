"""The cluster as a graph and the routes through it (no actors here)."""

from topology.graph import NoRouteError, Topology, TopologyError, transfer_ms
from topology.placement import Gpu, StagePlacement, gpus_from_topology, place
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
    "Gpu",
    "HostCosts",
    "NoReplicaError",
    "NoRouteError",
    "PlannerError",
    "ReplicaState",
    "Route",
    "RouteCache",
    "StagePlacement",
    "Topology",
    "TopologyError",
    "gpus_from_topology",
    "place",
    "plan",
    "route_cost",
    "route_to_mermaid",
    "transfer_ms",
]
