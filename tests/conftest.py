"""Shared test fixtures: a GCS emulator and a local Ray cluster, both on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.autoscaling import free_port


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """An in-memory GCS emulator; STORAGE_EMULATOR_HOST points every client (and every Ray
    worker started after it) at it."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    host = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    yield host
    server.stop()
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> str:
    """A fresh, empty bucket on the emulator, as a ``gs://`` URI."""
    from pipeline import storage

    name = f"test-{uuid.uuid4().hex[:10]}"
    storage._gcs_client().create_bucket(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def ray_cluster(gcs_emulator: str) -> Iterator[None]:
    """A local Ray cluster for tests that run stage code in-process. It starts after the
    GCS emulator so that its workers inherit STORAGE_EMULATOR_HOST."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def kill_leftover_pool_actors() -> list[str]:
    """Kill the Ray Data pool actors this test process's job still has alive, and name them.
    Between tests no dataset runs, so any is a leftover: in CI an Encoder of a tokenize test
    whose dataset failed on purpose was still alive minutes later, holding one of the
    cluster's two CPUs, and the next train worker group waited for it without end."""
    import ray
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    leftovers = [
        (actor_id, info["ActorClassName"])
        for actor_id, info in actors(actor_state_name="ALIVE").items()
        if info["JobID"] == job and info["ActorClassName"].startswith("MapWorker(")
    ]
    core_worker = ray._private.worker.global_worker.core_worker
    killed = []
    for actor_id, name in leftovers:
        # Only an actor this process holds a handle to can be killed from here; any other
        # is named by wait_for_free_cpus if it keeps the CPUs.
        with contextlib.suppress(ray.exceptions.ActorHandleNotFoundError):
            core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
            killed.append(name)
    return killed


def wait_for_free_cpus(cpus: float, timeout: float = 120.0) -> None:
    """Wait until the ``ray_cluster``'s CPUs are free for work that needs ``cpus`` at once
    (leftover Ray Data pool actors killed first); fail naming the live actors otherwise. A
    test that places a worker group would else wait for them without end, behind work an
    earlier test left running."""
    import logging
    import time

    import ray

    killed = kill_leftover_pool_actors()
    if killed:
        logging.getLogger(__name__).warning("killed leftover Ray Data actors: %s", killed)
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus:
        if time.monotonic() > deadline:
            table = ray._private.state.actors(actor_state_name="ALIVE").values()
            alive = [(a["ActorClassName"], a["Pid"]) for a in table]
            raise AssertionError(f"{cpus} CPUs not free after {timeout:.0f} s; alive: {alive}")
        time.sleep(0.5)
