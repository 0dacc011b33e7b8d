"""The cluster as a graph and the routes through it (no actors here).

The graph's and the planner's names load on first use (PEP 562): a stage process that needs only
`StageSpec` does not import networkx. `split` (a function named like its module) loads at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topology.errors import NoRouteError, SplitError, TopologyError
from topology.lazy import lazy_exports
from topology.split import StageCostModel, StageSpec, min_max_cuts, split

_WHERE = {
    "Topology": "topology.graph", "transfer_ms": "topology.graph",
    "Gpu": "topology.placement", "StagePlacement": "topology.placement",
    "gpus_from_topology": "topology.placement", "place": "topology.placement",
    "HostCosts": "topology.planner", "NoReplicaError": "topology.planner", "PlannerError": "topology.planner",
    "ReplicaState": "topology.planner", "Route": "topology.planner", "RouteCache": "topology.planner",
    "plan": "topology.planner", "route_cost": "topology.planner", "route_to_mermaid": "topology.planner",
}
__all__ = [
    "Gpu", "HostCosts", "NoReplicaError", "NoRouteError", "PlannerError", "ReplicaState", "Route", "RouteCache",
    "SplitError", "StageCostModel", "StagePlacement", "StageSpec", "Topology", "TopologyError",
    "gpus_from_topology", "min_max_cuts", "place", "plan", "route_cost", "route_to_mermaid", "split", "transfer_ms",
]
__getattr__, __dir__ = lazy_exports(globals(), _WHERE)

if TYPE_CHECKING:
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
