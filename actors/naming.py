"""Every Ray name meshpipe uses, in one place: the namespace, actor names, GCS key prefixes.

A deployment's actors are named, detached actors in namespace `meshpipe`, so another driver, the
CLI or an HTTP server attaches to them by name:

    meshpipe/<deployment>/router-0
    meshpipe/<deployment>/stage-<k>/replica-<r>
    meshpipe/<deployment>/weights | autoscaler | probe-<node id>
"""

from __future__ import annotations

NAMESPACE = "meshpipe"  # the Ray namespace of every meshpipe actor and GCS key


def actor_name(deployment: str, role: str) -> str:
    """`meshpipe/<deployment>/<role>`; an empty role gives the prefix of all of a deployment's actors."""
    return f"meshpipe/{deployment}/{role}"


def router_name(deployment: str) -> str:
    return actor_name(deployment, "router-0")


def stage_label(stage: int, replica: int) -> str:
    """The short name of a stage replica in logs and errors: `stage-<k>/replica-<r>`."""
    return f"stage-{stage}/replica-{replica}"


def stage_name(deployment: str, stage: int, replica: int) -> str:
    return actor_name(deployment, stage_label(stage, replica))


def weights_name(deployment: str) -> str:
    return actor_name(deployment, "weights")


def autoscaler_name(deployment: str) -> str:
    return actor_name(deployment, "autoscaler")


def probe_name(deployment: str, node_id: str) -> str:
    return actor_name(deployment, f"probe-{node_id}")


def journal_prefix(deployment: str) -> str:
    """GCS key-value prefix of the deployment's request journal."""
    return actor_name(deployment, "requests/")


def replicas_key(deployment: str) -> str:
    """GCS key-value key of the stages' infos as deployed (a restarted router's fallback)."""
    return actor_name(deployment, "replicas")
