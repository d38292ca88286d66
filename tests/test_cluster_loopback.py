"""``meshline submit`` to a real two-node Ray cluster on 127.0.0.1, and a worker node killed
mid-run.

The cluster is two ``ray start`` processes of our own (a head with the dashboard's Jobs API
and one CPU, and a worker node with one CPU), on their own ports and temp dir, with token
authentication on. Nothing else is touched: no ``ray stop``; teardown ends the process
groups we started and the processes naming our GCS address.

The pipeline (download from a local HTTP mirror, then dedup with ``shared_filesystem``:
both nodes see this machine's disk) is submitted once undisturbed; then ``submit --stage
dedup --force`` redoes dedup alone (download is reused) while the worker node is killed
(its whole process group, raylet included: SIGKILL) as soon as dedup has committed its first
unit. That job must still SUCCEED on the surviving head with dedup's output digest equal to
the undisturbed run's.

Found here, and fixed in ``pipeline.executor``: Ray Data's cluster-wide coordinator actor is
pinned to the node of the first process that ran a dataset, so when that node was the killed
worker every later dataset failed with ActorUnschedulableError (a stranded one is now
replaced); and when the stage actor itself was on the killed node, its call's counted retries
were used up before the GCS noticed the node was gone (the call now retries for as long as
the actor may restart).

Slow: two Ray jobs on a fresh cluster; minutes on a shared 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zstandard

from pipeline.ledger import Ledger
from pipeline.status import RUNNING, read_status
from tests.autoscaling import end_processes, free_port, gcs_alive_nodes, processes_naming
from tests.dedup_corpus import pile_line
from tests.httpserver import FileServer

ROOT = Path(__file__).resolve().parent.parent


class LoopbackCluster:
    """A Ray head and one worker node on 127.0.0.1, each a ``ray start --block`` process in
    its own process group."""

    def __init__(self) -> None:
        from ray._private.services import get_node_ip_address

        # Ray names the GCS by this machine's address even for a 127.0.0.1 node.
        self.gcs_address = f"{get_node_ip_address()}:{free_port()}"
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Short: Ray's unix sockets live under it.
        self.dir = tempfile.mkdtemp(prefix="ml-ray-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["RAY_AUTH_MODE"] = "token"
        self.processes: dict[str, subprocess.Popen] = {}
        self._address_file = None

    def _start(self, name: str, args: list[str]) -> None:
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, *ports]
        command += ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
        with open(os.path.join(self.dir, f"{name}.log"), "wb") as log:
            self.processes[name] = subprocess.Popen(
                [*command, "--block"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self, timeout: float = 120) -> None:
        from ray._common.utils import get_ray_address_file

        self._address_file = get_ray_address_file(None)
        with contextlib.suppress(OSError), open(self._address_file) as f:
            self._previous_address = f.read()
        port = self.gcs_address.rsplit(":", 1)[1]
        self._start(
            "head",
            [
                "--head",
                f"--port={port}",
                f"--temp-dir={self.dir}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        self.wait_for_nodes(1, timeout)
        self._start("worker", [f"--address={self.gcs_address}"])
        self.wait_for_nodes(2, timeout)

    def log(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
            return f.read()[-3000:]

    def alive_nodes(self) -> list[dict] | None:
        return gcs_alive_nodes(self.gcs_address, self.env)

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"ray start ({name}) exited: {self.log(name)}")
            nodes = self.alive_nodes()
            if nodes is not None and len(nodes) == count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{count} nodes did not come up: {self.log('head')}")

    def kill_worker(self) -> None:
        """The worker node dies at once: SIGKILL to its whole process group (raylet, its
        workers and agents)."""
        os.killpg(self.processes["worker"].pid, signal.SIGKILL)
        self.processes["worker"].wait()

    def stop(self) -> None:
        ours = set(processes_naming(self.gcs_address)) | set(processes_naming(self.dir))
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        end_processes(sorted(ours), 20)
        shutil.rmtree(self.dir, ignore_errors=True)
        if getattr(self, "_previous_address", None) is not None:
            with open(self._address_file, "w") as f:
                f.write(self._previous_address)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Iterator[FileServer]:
    """Pile-format files: two train files (with exact and near duplicates), val and test."""
    root = tmp_path_factory.mktemp("mirror")
    base = [f"doc {i} " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(60)) for i in range(40)]
    files = {
        "train/00.jsonl": base,
        "train/01.jsonl": base[:20] + [t + " extra" for t in base[20:]],
        "val.jsonl": base[:2],
        "test.jsonl": ["a test document"],
    }
    for name, texts in files.items():
        path = root / f"{name}.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(pile_line(t, "Github") for t in texts).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    with FileServer(str(root)).running() as server:
        yield server


def write_config(path: Path, root: Path, mirror: FileServer) -> None:
    config = {
        "name": "loopback",
        "root": str(root),
        "stage_modules": ["stages.download", "stages.dedup"],
        "stages": {
            "download": {
                "base_url": mirror.url + "/",
                "sources": ["train/00.jsonl.zst", "train/01.jsonl.zst"]
                + ["val.jsonl.zst", "test.jsonl.zst"],
            },
            "dedup": {
                "unit_docs": 5,
                "partitions": 2,
                "num_perm": 64,
                "min_workers": 1,
                "max_workers": 2,
                "parse_concurrency": 2,
                "shared_filesystem": True,
            },
        },
    }
    path.write_text(yaml.safe_dump(config))


def submit(cluster: LoopbackCluster, config: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "submit", str(config)]
            + ["--address", cluster.dashboard, "--wait", *extra],
            cwd=ROOT,
            env=dict(cluster.env, PYTHONPATH=str(ROOT)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def digest(root: Path, stage: str) -> str:
    return Ledger(str(next(root.glob(f"{stage}-*")))).digest()


def redoing(root: Path, stage: str) -> bool:
    """The stage is RUNNING again and has committed a unit of its new output."""
    output = str(next(root.glob(f"{stage}-*")))
    status = read_status(output)
    return status is not None and status.state == RUNNING and committed(root, stage) > 0


def committed(root: Path, stage: str) -> int:
    outputs = list(root.glob(f"{stage}-*"))
    return len(Ledger(str(outputs[0])).records()) if outputs else 0


@pytest.mark.timeout(900)
def test_submit_survives_a_worker_node_killed_mid_run(cluster, mirror, tmp_path):
    root, config = tmp_path / "root", tmp_path / "pipeline.yaml"
    write_config(config, root, mirror)
    job = submit(cluster, config, tmp_path / "first.log")
    assert job.wait(timeout=420) == 0, (tmp_path / "first.log").read_text()[-4000:]
    assert "SUCCEEDED" in (tmp_path / "first.log").read_text()
    expected = {stage: digest(root, stage) for stage in ("download", "dedup")}
    fetched = mirror.data_hits()

    log = tmp_path / "rerun.log"
    job = submit(cluster, config, log, "--stage", "dedup", "--force")
    try:
        deadline = time.monotonic() + 300
        # --force deletes dedup's output first: wait for a unit committed by this job.
        while not redoing(root, "dedup"):
            assert job.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        units_at_kill = committed(root, "dedup")
        cluster.kill_worker()
        assert job.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    output = log.read_text()
    assert "SUCCEEDED" in output, output[-4000:]
    # The kill came before dedup finished, only the head is left, download was not redone.
    assert units_at_kill < committed(root, "dedup"), output[-4000:]
    assert len(cluster.alive_nodes() or []) == 1
    assert mirror.data_hits() == fetched
    assert {stage: digest(root, stage) for stage in expected} == expected
