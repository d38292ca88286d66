"""Ray Data on a cluster whose nodes come and go: what the executor and the stages share.

Kept apart from ``pipeline.executor`` so that Ray workers running a stage's tasks import Ray
only (the executor imports MLflow, seconds of start-up in every worker).
"""

from __future__ import annotations

import logging
import time

import ray

log = logging.getLogger("meshline")

DATA_COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")
"""Name and namespace of Ray Data's cluster-wide autoscaling coordinator actor."""


def quiet_ray_data() -> None:
    """Ray Data's own console output off in this process: its progress bars, the plan it
    prints when a dataset starts, its INFO logs (hints about its progress UI) and its warning
    that the bars are off. The stages log their own progress and summaries; Ray Data's other
    warnings still show."""
    import ray.data
    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data warns once per process that its bars are off, under this key: spend it here.
    log_once("ray_data_progress_manager_disabled")


def release_stranded_data_coordinator(timeout: float = 30.0) -> None:
    """Ray Data (2.60) creates its coordinator as a detached actor with a hard affinity to
    the node of the first process that ran a dataset. If that node dies the actor can never
    be placed again and every later dataset on the cluster fails (ActorUnschedulableError).
    Such a stranded coordinator is killed here, so that the next dataset creates a new one
    on a live node: stages call this before each dataset they run (a node may die mid-stage),
    the stage actor before each stage."""
    from ray._private.state import actors

    try:
        handle = ray.get_actor(DATA_COORDINATOR[0], namespace=DATA_COORDINATOR[1])
    except ValueError:
        return
    info = actors(handle._actor_id.hex())
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    if info.get("State") == "ALIVE" and info.get("Address", {}).get("NodeID") in alive:
        return
    log.warning("Ray Data's coordinator is stranded (%s); replacing it", info.get("State"))
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(DATA_COORDINATOR[0], namespace=DATA_COORDINATOR[1])
        except ValueError:
            return
        time.sleep(0.2)
