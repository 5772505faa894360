"""Role placement and threads on the cluster.

Each stage asks for its role's custom resource (`inference`, `training`). A role that no node
offers (nor any node group the autoscaler can launch) is an error naming the fix: start those
nodes with the resource, or set `allow_unpinned: true` in the config, under which the stage
runs unpinned, with a warning. The local node `carryon run` starts itself offers every role.

Torch in a task or actor uses as many threads as Ray granted it CPUs (`granted_threads`), not
every core of the node it shares with other tasks.
"""

from __future__ import annotations

import json
import logging

import ray

logger = logging.getLogger(__name__)


def _alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def _launchable() -> dict[str, float]:
    """The resources the autoscaler's node groups can bring up (KubeRay worker groups that
    scale from zero); empty where the cluster does not autoscale."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a cluster without an autoscaler config
        return {}


def role_resources(
    requested: dict[str, float], *, allow_unpinned: bool = False, key: str = "resources"
) -> dict[str, float]:
    """`requested` where the cluster offers every resource in it. A resource no alive node
    offers, and no autoscaler node group can, is an error naming the fix; under
    `allow_unpinned` it is dropped with a warning instead. `key` names the config key in
    messages (e.g. `train.resources`)."""
    nodes = _alive_nodes()
    kept = {name: amount for name, amount in requested.items() if any(n.get(name, 0) > 0 for n in nodes)}
    missing = sorted(requested.keys() - kept.keys())
    if missing:
        launchable = _launchable()
        for name in [name for name in missing if launchable.get(name, 0) > 0]:
            kept[name] = requested[name]
            missing.remove(name)
    if not missing:
        return kept
    flag = json.dumps(dict.fromkeys(missing, 100))
    names = ", ".join(f"'{name}'" for name in missing)
    if not allow_unpinned:  # the config asks for what the cluster lacks: `carryon` prints it
        raise ValueError(
            f"{key} asks for {names}, which no node of the cluster offers, so the stage cannot be "
            f"placed on its role; start the nodes for it with `ray start ... --resources='{flag}'`, "
            "or set `allow_unpinned: true` in the config to run it on any node"
        )
    logger.warning(
        "%s asks for %s, which no node of the cluster offers; allow_unpinned: true runs the stage "
        "on any node (start its nodes with --resources='%s' to pin it)", key, names, flag,
    )
    return kept


def gpus_per_actor(resources: dict[str, float]) -> float:
    """One GPU per actor where a node that offers the role also has a GPU, else none."""
    return 1.0 if any(
        n.get("GPU", 0) > 0 and all(n.get(k, 0) >= v for k, v in resources.items())
        for n in _alive_nodes()
    ) else 0.0


def granted_threads(override: int | None) -> int:
    """Torch threads for the current Ray task or actor: `override` when set, else the CPUs Ray
    granted it (whole CPUs, at least 1). Outside a task or actor nothing is granted: 1."""
    if override is not None:
        return max(1, int(override))
    worker = ray._private.worker.global_worker
    if not ray.is_initialized() or worker.mode != ray._private.worker.WORKER_MODE:
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus))
