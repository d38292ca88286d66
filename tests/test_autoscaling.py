"""Autoscaled preprocessing on a fake autoscaling Ray cluster: a head with no CPUs and an
autoscaler that adds fake worker nodes (2 CPUs each, at most 2) on demand and removes them
once idle.

Each test runs a driver (``python -m tests.autoscaling``) that does one piece of work with
a fixed pool of one actor, then again with an actor pool of min 1 / max 2, and checks that
the pool grew from one actor to two alive at the same time (their lifetimes in the GCS actor
table overlap), that both did work (distinct pids among the producers the work reports),
and that the result equals the fixed pool's:

- tokenize's encoder pool, over the whole stage: also that the cluster grew from no worker
  node and that the nodes go away after the runs; the output is byte-identical.
- dedup's signature pool, over the signing phase alone (parse and exact run once, before;
  the band shuffle after signing would add ~30 s per run on the fake cluster): each unit is
  one document that is heavy to sign, so one actor is still busy when the second is ready to
  take units (an actor can take ~10 s to start on this shared machine); the signature
  files are identical.

Why 2-CPU nodes: Ray Data grows an actor pool only within the CPUs the cluster has now, and
asks the cluster for more only after measuring throughput for a while (requests at least 10 s
apart), so with 1-CPU nodes the second actor waited for a second node (seen here: a 14 s
tokenize run ended on one actor while the second node arrived at 20 s). With two CPUs per
node the pool's own autoscaler is what is tested, and node autoscaling still is (0 -> 1+).

The driver is a subprocess connected to that cluster: this pytest process may already hold
its own Ray session (the ``ray_cluster`` fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.autoscaling import SIGNING_UNITS, FakeAutoscalingCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeAutoscalingCluster]:
    cluster = FakeAutoscalingCluster(
        {"cpu_worker": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=0.25,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def worker_nodes(cluster: FakeAutoscalingCluster) -> list[dict] | None:
    """Alive nodes with CPUs (the head has none), or None if the GCS did not answer."""
    nodes = cluster.alive_nodes()
    return None if nodes is None else [n for n in nodes if n["cpus"] > 0]


def wait_until_no_workers(cluster: FakeAutoscalingCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    counts = []
    while time.monotonic() < deadline:
        workers = worker_nodes(cluster)
        counts.append(None if workers is None else len(workers))
        if workers == []:
            return
        time.sleep(0.5)
    raise AssertionError(f"worker nodes still alive; counts seen: {counts}")


def drive(cluster: FakeAutoscalingCluster, work, mode: str) -> tuple[dict, dict, list[int]]:
    """Run the driver in ``mode``; returns the autoscaling and fixed runs' results and the
    worker-node counts polled while it ran."""
    wait_until_no_workers(cluster, 120)
    log = work / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tests.autoscaling", cluster.address, str(work), mode],
            env=dict(cluster.env, PYTHONPATH=ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    counts = []
    try:
        deadline = time.monotonic() + 240
        while driver.poll() is None and time.monotonic() < deadline:
            workers = worker_nodes(cluster)
            if workers is not None:
                counts.append(len(workers))
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
    output = log.read_text()
    assert driver.returncode == 0, output[-4000:]
    results = {
        r["run"]: r
        for r in (
            json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")
        )
    }
    assert set(results) == {"autoscaling", "fixed"}, output[-4000:]
    return results["autoscaling"], results["fixed"], counts


def most_at_once(actors: list[dict]) -> int:
    """The most pool actors alive at the same moment, from their start and end times."""
    started = [a for a in actors if a["start_ms"] > 0]
    events = sorted([(a["start_ms"], 1) for a in started] + [(a["end_ms"], -1) for a in started])
    alive = peak = 0
    for _, change in events:
        alive += change
        peak = max(peak, alive)
    return peak


@pytest.mark.timeout(300)
def test_tokenize_encoder_pool_grows_from_min_to_max(cluster, tmp_path):
    autoscaling, fixed, counts = drive(cluster, tmp_path, "tokenize")
    assert counts and counts[0] == 0 and max(counts) >= 1, f"worker nodes polled: {counts}"
    assert most_at_once(autoscaling["actors"]) == 2, autoscaling["actors"]
    assert most_at_once(fixed["actors"]) == 1, fixed["actors"]
    assert autoscaling["digest"] == fixed["digest"]
    assert autoscaling["metrics"]["workers"] == 2
    assert fixed["metrics"]["workers"] == 1
    wait_until_no_workers(cluster, 120)


@pytest.mark.timeout(300)
def test_dedup_signature_pool_grows_from_min_to_max(cluster, tmp_path):
    autoscaling, fixed, _ = drive(cluster, tmp_path, "dedup-signing")
    assert most_at_once(autoscaling["actors"]) == 2, autoscaling["actors"]
    assert most_at_once(fixed["actors"]) == 1, fixed["actors"]
    # The producers the signed rows name are the pool's actors, and both of them signed.
    assert len(autoscaling["workers"]) == 2, autoscaling
    assert set(autoscaling["workers"]) == {a["pid"] for a in autoscaling["actors"]}
    assert len(fixed["workers"]) == 1, fixed
    assert len(autoscaling["signatures"]) == SIGNING_UNITS
    assert autoscaling["signatures"] == fixed["signatures"]
