"""Role placement: each stage asks for its role's custom resource (`inference`, `training`).

A cluster started without role resources (a plain `ray start --head`) still runs every stage:
the missing resource is dropped with a warning instead of leaving actors pending forever.
"""

from __future__ import annotations

import logging

import ray

logger = logging.getLogger(__name__)


def _alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def role_resources(requested: dict[str, float]) -> dict[str, float]:
    """Keep each requested resource that some alive node offers; warn about the rest."""
    nodes = _alive_nodes()
    kept = {name: amount for name, amount in requested.items() if any(n.get(name, 0) > 0 for n in nodes)}
    for name in requested.keys() - kept.keys():
        logger.warning(
            "the cluster has no '%s' resource, so this stage is not pinned to it; start its nodes "
            "with --resources='{\"%s\": 100}' to pin it", name, name,
        )
    return kept


def gpus_per_actor(resources: dict[str, float]) -> float:
    """One GPU per actor where a node that offers the role also has a GPU, else none."""
    return 1.0 if any(
        n.get("GPU", 0) > 0 and all(n.get(k, 0) >= v for k, v in resources.items())
        for n in _alive_nodes()
    ) else 0.0
