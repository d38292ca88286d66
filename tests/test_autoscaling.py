"""Autoscaled preprocessing on a fake autoscaling Ray cluster: a head with no CPUs and an
autoscaler that adds fake worker nodes (2 CPUs each, at most 2) on demand and removes them
once idle.

With tokenize's encoder pool configured min 1 / max 2, a driver (``python -m
tests.autoscaling``) runs the stage, then runs it again with a fixed pool of one actor. The
test checks that the cluster grew from no worker node, that the pool grew from one actor to
two alive at the same time (their lifetimes in the GCS actor table overlap) that both encoded
batches (distinct pids among the batches' producers), that the output is byte-identical to
the fixed pool's, and that the nodes go away after the runs.

Dedup's signature pool is not tested here: Ray Data does decide to grow it (its log says
"Scaling up MapWorker(MapBatches(Signer)) actor pool by 1 (reason=utilization of 2.0 >=
1.75)"), but on this shared machine the second actor took ~10 s to start, so a signing phase
short enough for a test often ended first, and each dedup run spends ~30 s in the band
shuffle on the fake cluster: over this suite's time budget.

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

from tests.autoscaling import FakeAutoscalingCluster

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


def drive(cluster: FakeAutoscalingCluster, work) -> tuple[dict, dict, list[int]]:
    """Run the driver; returns the autoscaling and fixed runs' results and the
    worker-node counts polled while it ran."""
    wait_until_no_workers(cluster, 120)
    log = work / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tests.autoscaling", cluster.address, str(work)],
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
    autoscaling, fixed, counts = drive(cluster, tmp_path)
    assert counts and counts[0] == 0 and max(counts) >= 1, f"worker nodes polled: {counts}"
    assert most_at_once(autoscaling["actors"]) == 2, autoscaling["actors"]
    assert most_at_once(fixed["actors"]) == 1, fixed["actors"]
    assert autoscaling["digest"] == fixed["digest"]
    assert autoscaling["metrics"]["workers"] == 2
    assert fixed["metrics"]["workers"] == 1
    wait_until_no_workers(cluster, 120)
