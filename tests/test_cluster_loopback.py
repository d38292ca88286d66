"""The demo pipeline through ``meshline submit`` on a real two-node Ray cluster on 127.0.0.1,
then one stage forced again while a worker node is killed.

The cluster is two ``ray start`` processes of our own (a head with the dashboard's Jobs API
and one CPU, and a worker node with one CPU), on their own ports and temp dir, with token
authentication on. Nothing else is touched: no ``ray stop``; teardown ends the process
groups we started and the processes naming our GCS address.

``configs/demo.yaml`` (all its stages, on a smaller corpus, four training steps and a small
evaluation; dedup with ``shared_filesystem``: both nodes see this machine's disk) is submitted
once undisturbed, logging to a real ``mlflow server`` on 127.0.0.1: it must SUCCEED with its
stage actors on both nodes, and every stage's child run (config, output digest, metrics,
upstream datasets) and the registered export are found over HTTP with MLflow's client.
Then ``submit --stage tokenize --force`` redoes tokenize alone while the worker node is
killed (its whole process group, raylet included: SIGKILL) as soon as tokenize has committed
its first unit. While it
is redone ``meshline status`` shows train, convert and evaluate STALE; the job must still
SUCCEED on the surviving head, upstream stages reused and downstream ones untouched, with
tokenize's output digest equal to the undisturbed run's (so downstream is current again).

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
import json
import os
import re
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
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import lineage, plan
from pipeline.config import load_config
from pipeline.ledger import Ledger
from pipeline.status import RUNNING, Status, read_status
from tests.autoscaling import (
    end_processes,
    ensure_auth_token,
    free_port,
    gcs_alive_nodes,
    own_ports,
    processes_naming,
)
from tests.mlflow_server import running_mlflow_server

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
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, *own_ports()]
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

        ensure_auth_token(self.env)
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
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


DEMO = ROOT / "configs" / "demo.yaml"
STAGES = ("demo_corpus", "download", "dedup", "tokenize", "train", "convert", "evaluate")
DOWNSTREAM = ("train", "convert", "evaluate")


def write_demo_config(path: Path, root: Path, tracking_uri: str) -> None:
    """configs/demo.yaml, every stage of it, on a smaller corpus, model run and evaluation,
    logging to the MLflow server at ``tracking_uri``."""
    config = yaml.safe_load(DEMO.read_text())
    config["root"] = str(root)
    config["tracking_uri"] = tracking_uri
    stages = config["stages"]
    stages["demo_corpus"] = {"train_shards": 2, "max_text_mb": 2, "math_documents": 200}
    # Both nodes see this machine's disk, so dedup may work on either.
    stages["dedup"].update(unit_docs=150, partitions=2, shared_filesystem=True)
    stages["tokenize"]["tokenizer"].update(vocab_size=512, sample_mb=0.5)
    stages["tokenize"]["seq_len"] = 64
    stages["train"].update(
        model_overrides={"vocab_size": 512},
        global_batch=4,
        steps=4,
        val_every=2,
        val_batches=1,
        checkpoint_every=2,
        optimizer={"lr": 0.002, "end_lr": 0.0002, "warmup_steps": 1, "anneal_steps": 3},
    )
    stages["evaluate"].update(
        demo_tasks={"lambada": 8, "choice": 8},
        bits_per_byte={"max_bytes_per_component": 4000},
        compare_initial=False,
        samples={"prompts": ["def "], "max_new_tokens": 4},
    )
    path.write_text(yaml.safe_dump(config))


def assert_lineage_over_http(client: MlflowClient, first: dict[str, Status]) -> None:
    """What each stage actor, on either node, logged to the server: the parent run, a child run
    per stage with its config, output digest, metrics and upstream datasets, and the export
    registered as a model version linked to the training run."""
    experiment = client.get_experiment_by_name(yaml.safe_load(DEMO.read_text())["name"])
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert parent.info.status == "FINISHED"
    children = {
        r.data.tags[lineage.TAG_STAGE]: r
        for r in runs
        if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id
    }
    assert set(children) == set(STAGES)
    for stage, status in first.items():
        run = children[stage]
        assert (run.info.run_id, run.info.status) == (status.mlflow_run_id, "FINISHED")
        assert run.data.params, stage
        assert run.data.tags[lineage.TAG_DIGEST] == status.digest
        logged = {key: run.data.metrics.get(key) for key in status.metrics}
        assert status.metrics and logged == pytest.approx(status.metrics), stage
        datasets = client.get_run(run.info.run_id).inputs.dataset_inputs
        upstream = {d.dataset.name.split("-")[0]: d.dataset.digest for d in datasets}
        assert {s: upstream[s] for s in status.inputs} == {
            s: first[s].digest[:32] for s in status.inputs
        }, stage
    (version,) = client.search_model_versions(f"name='{experiment.name}'")
    assert version.run_id == children["train"].info.run_id
    # The training run sampled its node's use while it trained.
    system = [key for key in children["train"].data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, system
    assert experiment.tags[lineage.TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert version.tags["meshline.tokenize_digest"] == first["tokenize"].digest
    # Evaluate ran beside convert; its scores reached the version either way round.
    scores = {
        key.removeprefix(lineage.SCORE_TAG): float(value)
        for key, value in version.tags.items()
        if key.startswith(lineage.SCORE_TAG)
    }
    evaluated = children["evaluate"].data.metrics
    assert scores and scores == pytest.approx({k: evaluated[k] for k in scores}, rel=1e-5)


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


def stage_states(config: Path) -> dict[str, str]:
    """``meshline status --json``: what a user sees."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", str(config), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {report["stage"]: report["state"] for report in json.loads(out)}


def train_controllers(cluster: LoopbackCluster) -> list[dict]:
    """Ray Train's controller actors on the cluster, as ``ray list actors`` shows them: one
    per training run, alive or finished."""
    listed = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "list", "actors", "--format", "json"]
        + ["--address", cluster.dashboard]
        + ["--filter", "class_name=TrainController"],
        env=cluster.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(listed)


def output(root: Path, stage: str) -> str:
    return str(next(root.glob(f"{stage}-*")))


def statuses(root: Path) -> dict[str, Status]:
    return {stage: read_status(output(root, stage)) for stage in STAGES}


def redoing(root: Path, stage: str) -> bool:
    """The stage is RUNNING again and has committed a unit of its new output."""
    outputs = list(root.glob(f"{stage}-*"))
    status = read_status(str(outputs[0])) if outputs else None
    return status is not None and status.state == RUNNING and committed(root, stage) > 0


def committed(root: Path, stage: str) -> int:
    outputs = list(root.glob(f"{stage}-*"))
    return len(Ledger(str(outputs[0])).records()) if outputs else 0


def assert_console_tells_the_run(console: str) -> None:
    """What a person following the job's log reads: each stage's summary, the training
    steps as they go and the evaluate table, and none of Ray Data's progress bars, execution
    plans or hints."""
    for summary in (
        r"download: \d+ files",
        r"dedup: \d+ docs in, \d+ out",
        r"tokenize: train \d+ rows",
        r"train: step \d+/\d+: loss [\d.]+",
        r"train: \d+ steps, train loss",
        r"evaluate: \d+ metrics in",
        r"task\s+metric\s+ours\s+.*GPT-J-6B",
    ):
        assert re.search(summary, console), summary
    # Training lines come while it trains, before its summary; the driver adds plain progress
    # lines (a job log is not a terminal) for the stages that count units.
    before_end = console[: re.search(r"train: \d+ steps, train loss", console).start()]
    assert len(re.findall(r"train: step \d+/\d+: loss", before_end)) >= 3
    assert re.search(r"\d\d:\d\d:\d\d (download|dedup|tokenize|train|evaluate): \d+/\d+ ", console)
    assert "Starting execution of Dataset" not in console
    assert "Running Dataset" not in console
    assert "Progress bars disabled" not in console


@pytest.mark.timeout(1200)
def test_demo_submitted_spreads_over_nodes_and_a_forced_stage_survives_a_node_kill(
    cluster, tracking, tmp_path
):
    root, config = tmp_path / "root", tmp_path / "pipeline.yaml"
    write_demo_config(config, root, tracking)
    job = submit(cluster, config, tmp_path / "first.log")
    assert job.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-4000:]
    assert "SUCCEEDED" in (tmp_path / "first.log").read_text()
    assert_console_tells_the_run((tmp_path / "first.log").read_text())
    assert stage_states(config) == dict.fromkeys(STAGES, "DONE")
    first = statuses(root)
    nodes = {node["node_id"] for node in cluster.alive_nodes() or []}
    assert {status.node for status in first.values()} == nodes
    assert_lineage_over_http(MlflowClient(tracking_uri=tracking), first)
    # The train stage ran as a Ray Train run, and the programs it and evaluate compiled are
    # in the pipeline's compilation cache for the next run.
    assert train_controllers(cluster)
    assert list((root / "compilation-cache").iterdir())

    log = tmp_path / "rerun.log"
    loaded = load_config(str(config))
    plan.report(loaded)  # imports the stage modules now rather than in the window below
    job = submit(cluster, config, log, "--stage", "tokenize", "--force")
    try:
        deadline = time.monotonic() + 300
        # --force deletes tokenize's output first: wait for a unit committed by this job.
        while not redoing(root, "tokenize"):
            assert job.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        units_at_kill = committed(root, "tokenize")
        # Read in this process, not through ``meshline status``: a new process takes seconds
        # to start, time enough for tokenize to finish on a quiet machine.
        during = {report.stage: report.state for report in plan.report(loaded)}
        cluster.kill_worker()
        assert job.wait(timeout=420) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    text = log.read_text()
    assert "SUCCEEDED" in text, text[-4000:]
    # While tokenize was redone everything downstream of it was STALE, upstream DONE.
    assert during == {**dict.fromkeys(STAGES, "DONE"), "tokenize": "RUNNING"} | dict.fromkeys(
        DOWNSTREAM, "STALE"
    )
    # The kill came before tokenize finished, and only the head is left.
    assert units_at_kill < committed(root, "tokenize"), text[-4000:]
    # The GCS declares the killed node dead once its health checks fail, which can be after
    # tokenize has finished on the head (seen in CI).
    deadline = time.monotonic() + 90
    while len(cluster.alive_nodes() or []) != 1:
        assert time.monotonic() < deadline, cluster.alive_nodes()
        time.sleep(0.5)
    after = statuses(root)
    assert after["tokenize"].finished > first["tokenize"].finished
    # Only tokenize was redone: upstream was reused, downstream was not run.
    assert {s: after[s] for s in STAGES if s != "tokenize"} == {
        s: first[s] for s in STAGES if s != "tokenize"
    }
    # Its new output is the same bytes, so what was trained on it is current again.
    assert after["tokenize"].digest == first["tokenize"].digest
    assert stage_states(config) == dict.fromkeys(STAGES, "DONE")
