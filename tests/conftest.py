"""Shared test fixtures: a GCS emulator and a local Ray cluster, both on 127.0.0.1."""

from __future__ import annotations

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


def wait_for_free_cpus(cpus: float, timeout: float = 120.0) -> None:
    """Wait until the ``ray_cluster``'s CPUs are free for work that needs ``cpus`` at once;
    fail naming the live actors otherwise. A test that places a worker group would else wait
    for them without end, behind work an earlier test left running."""
    import time

    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus:
        if time.monotonic() > deadline:
            table = ray._private.state.actors(actor_state_name="ALIVE").values()
            alive = [(a["ActorClassName"], a["Pid"]) for a in table]
            raise AssertionError(f"{cpus} CPUs not free after {timeout:.0f} s; alive: {alive}")
        time.sleep(0.5)
