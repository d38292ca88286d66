"""The tokenize stage's actor pool on a fake autoscaling cluster: a head with no CPUs, so every
tokenizer actor needs a worker node; the autoscaler adds fake worker nodes (1 CPU each, at most
2) while the stage runs and removes them once they sit idle after it.

The pool is sized workers_min = workers_max = 2: with min 1 / max 2 Ray Data asks for the
second CPU only after the first actor has been busy a while, and a short run often ends on one
node (seen here: 2 nodes in one run of two), so the test pins the size to stay deterministic.

The stage runs in a subprocess driver connected to that cluster: this pytest process may
already hold its own Ray session (the ``ray_cluster`` fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.autoscaling import FakeAutoscalingCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = """
import json, os, sys
import ray
from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.tokenize import TokenizeConfig, read_manifest, run
from tests.tokenize_data import gpt2_ranks_path, stdlib_texts, write_part

address, work = sys.argv[1], sys.argv[2]
dedup, output = os.path.join(work, "dedup"), os.path.join(work, "tokenize-fp")
for part in range(8):
    texts = [t * 12 for t in stdlib_texts(24, 24 * part)]
    rows = [(t, "Github", f"train/{part:02d}.jsonl.zst:{i + 1}") for i, t in enumerate(texts)]
    write_part(os.path.join(dedup, f"train/part-{part:05d}.parquet"), rows)
ray.init(address=address, log_to_driver=False)
config = TokenizeConfig.model_validate(
    {
        "tokenizer": {"kind": "gpt2", "source": gpt2_ranks_path()},
        "seq_len": 127,
        "splits": ["train"],
        "workers_min": 2,
        "workers_max": 2,
    }
)
ctx = StageContext(
    name="tokenize",
    config=config,
    output=output,
    inputs={"dedup": Upstream("dedup", dedup, "fp", "digest")},
    ledger=Ledger(output),
    pipeline_root=work,
)
print("RUNNING", flush=True)
run(ctx)
manifest = read_manifest(output)
print("DONE " + json.dumps({"rows": manifest["splits"]["train"]["rows"]}), flush=True)
"""


def wait_for(cluster: FakeAutoscalingCluster, want, timeout: float, seen: list) -> list[dict]:
    """Poll the cluster's alive worker nodes (nodes with CPUs: the head has none) until
    ``want(workers)``; ``seen`` gets (seconds, count) per poll."""
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        nodes = cluster.alive_nodes()
        if nodes is not None:
            workers = [n for n in nodes if n["cpus"] > 0]
            seen.append((round(time.monotonic() - start, 1), len(workers)))
            if want(workers):
                return workers
        time.sleep(0.5)
    raise AssertionError(f"timed out; worker counts seen (time, count): {seen}")


@pytest.mark.timeout(300)
def test_tokenize_pool_scales_out_and_back(tmp_path):
    cluster = FakeAutoscalingCluster(
        {"cpu_worker": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=0.1,
    )
    driver = None
    try:
        cluster.start()
        seen: list = []
        assert wait_for(cluster, lambda w: True, 30, seen) == []
        env = dict(cluster.env, PYTHONPATH=ROOT)
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, cluster.address, str(tmp_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        start = time.monotonic()
        peak = 0
        counts = []
        while driver.poll() is None and time.monotonic() < start + 180:
            nodes = cluster.alive_nodes()
            if nodes is not None:
                workers = [n for n in nodes if n["cpus"] > 0]
                peak = max(peak, len(workers))
                counts.append((round(time.monotonic() - start, 1), len(workers)))
            time.sleep(0.5)
        output = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, output[-4000:]
        assert "DONE" in output, output[-4000:]
        assert peak == 2, f"worker nodes during the run (s, count): {counts}"
        seen = []
        wait_for(cluster, lambda w: w == [], 120, seen)
        print("during", counts, "after", seen)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        cluster.stop()
