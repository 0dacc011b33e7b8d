"""The cluster as a graph and the routes through it (no actors here)."""

from topology.errors import NoRouteError, SplitError, TopologyError
from topology.graph import Topology, transfer_ms
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
from topology.split import StageCostModel, StageSpec, min_max_cuts, split

__all__ = [
    "Gpu",
    "HostCosts",
    "NoReplicaError",
    "NoRouteError",
    "PlannerError",
    "ReplicaState",
    "Route",
    "RouteCache",
    "SplitError",
    "StageCostModel",
    "StagePlacement",
    "StageSpec",
    "Topology",
    "TopologyError",
    "gpus_from_topology",
    "min_max_cuts",
    "place",
    "plan",
    "route_cost",
    "route_to_mermaid",
    "split",
    "transfer_ms",
]
