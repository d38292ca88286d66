"""The ``meshline`` command end to end, as a user runs it: the demo pipeline's download
stage, reruns, --force, status, kills at any moment, MLflow lineage, and submission to a
real Ray head on 127.0.0.1."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline import lineage
from pipeline.logs import LOG_FILE
from stages.demo_corpus import CHECKSUMS, DemoCorpusConfig, build_demo_corpus
from tests.autoscaling import free_port, own_ports
from tests.dedup_corpus import encoded, pile_record
from tests.httpserver import FileServer
from tests.hubserver import HubServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.yaml")
MESHLINE = shutil.which("meshline") or "meshline"


def meshline(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``meshline ARGS`` in the repo, with ``env`` added to this process's environment."""
    return subprocess.run(
        [MESHLINE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def status(config: str, root: str) -> dict[str, dict]:
    result = meshline("status", config, "--set", f"root={root}", "--json")
    assert result.returncode == 0, result.stderr
    return {r["stage"]: r for r in json.loads(result.stdout)}


def read_json(path: str):
    return json.loads(Path(path).read_text())


def mirror_files(mirror: str) -> dict[str, bytes]:
    lines = Path(mirror, CHECKSUMS).read_text().split("\n")
    names = [line.split()[1] for line in lines if line.strip()]
    return output_files(mirror, names)


def output_files(output: str, names) -> dict[str, bytes]:
    return {name: Path(output, name).read_bytes() for name in names}


def test_demo_download_runs_skips_and_forces(tmp_path):
    root = str(tmp_path / "root")
    assert status(DEMO, root)["download"]["state"] == "PENDING"

    first = meshline("run", DEMO, "--stage", "download", "--set", f"root={root}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "download   done" in first.stdout
    # The local cluster keeps Ray's token authentication without Ray's notice of it.
    assert "Token authentication" not in first.stdout + first.stderr
    # The stage actor's own summary reaches the console (its INFO lines once did not).
    assert re.search(r"download: \d+ files, [\d.]+ MB in", first.stdout + first.stderr)
    report = status(DEMO, root)["download"]
    assert report["state"] == "DONE" and report["digest"]
    mirror = glob.glob(os.path.join(root, "demo_corpus-*"))[0]
    expected = mirror_files(mirror)
    assert output_files(report["output"], expected) == expected
    manifest = read_json(os.path.join(report["output"], "manifest.json"))
    assert sorted(f["name"] for f in manifest["files"]) == sorted(expected)

    second = meshline("run", DEMO, "--stage", "download", "--set", f"root={root}")
    assert second.returncode == 0 and "download   reused" in second.stdout
    assert status(DEMO, root)["download"] == report

    forced = meshline("run", DEMO, "--set", f"root={root}", "--stage", "download", "--force")
    assert forced.returncode == 0 and "download   done" in forced.stdout
    after = status(DEMO, root)["download"]
    assert after["state"] == "DONE" and after["digest"] == report["digest"]
    assert after["mlflow_run_id"] != report["mlflow_run_id"]

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], "tags.`meshline.stage` = 'download'")
    assert len(runs) == 3
    produced = client.get_run(report["mlflow_run_id"])
    assert produced.info.status == "FINISHED"
    corpus = client.get_run(status(DEMO, root)["demo_corpus"]["mlflow_run_id"])
    assert corpus.data.params["train_shards"] == "4"
    assert produced.data.tags[lineage.TAG_OUTPUT] == report["output"]
    assert produced.data.tags[lineage.TAG_FINGERPRINT] == report["fingerprint"]
    assert produced.data.metrics["files"] == len(expected)
    assert produced.data.metrics["bytes"] == sum(len(b) for b in expected.values())
    inputs = {"source": {}, "input": {}}
    for d in produced.inputs.dataset_inputs:
        context = {t.key: t.value for t in d.tags}[MLFLOW_DATASET_CONTEXT]
        inputs[context][d.dataset.name] = d.dataset
    sources = inputs["source"]
    assert set(sources) == set(expected)
    assert list(inputs["input"]) == [os.path.basename(mirror)]
    assert json.loads(sources["val.jsonl.zst"].source)["uri"].startswith(mirror)
    digest = json.loads(sources["val.jsonl.zst"].profile)["digest"]
    assert digest == next(f["sha256"] for f in manifest["files"] if f["name"] == "val.jsonl.zst")
    reused = [r for r in runs if r.data.tags.get(lineage.TAG_REUSED) == "true"]
    assert [r.data.tags[lineage.TAG_REUSED_FROM] for r in reused] == [report["mlflow_run_id"]]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert all(client.get_run(p).info.status == "FINISHED" for p in parents)
    # Ray Data's own progress output is off unless asked for (dedup runs a Ray Data job).
    verbose = meshline("run", DEMO, "--stage", "dedup", "--verbose", "--set", f"root={root}")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    said = verbose.stderr + verbose.stdout
    assert re.search(r"Starting execution of Dataset|Running Dataset", said), said[-3000:]
    # The stage's log is kept in its output and in its MLflow run.
    kept = Path(after["output"], LOG_FILE).read_text()
    assert re.search(r"INFO meshline.download: download: \d+ files, [\d.]+ MB in", kept)
    logged = client.download_artifacts(after["mlflow_run_id"], "logs/log.txt", str(tmp_path))
    assert Path(logged).read_text() == kept


def one_line_error(result: subprocess.CompletedProcess, status: int, says: str) -> None:
    """``result`` failed with ``status`` and said ``says`` in one line, without a traceback."""
    assert result.returncode == status, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshline: ")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_dag_and_config_errors(tmp_path):
    dag = meshline("dag", DEMO, "--set", "root=/tmp/x")
    assert dag.returncode == 0 and "download" in dag.stdout and "/tmp/x/download-" in dag.stdout
    bad = meshline("run", DEMO, "--set", "stages.download.concurency=2")
    one_line_error(bad, 2, "demo.yaml: stages.download.concurency: Extra inputs are not permitted")
    wrong = meshline("status", DEMO, "--set", "stages.demo_corpus.train_shards=lots")
    one_line_error(wrong, 2, "stages.demo_corpus.train_shards")
    # The field is named once, without lines about the stages that read the invalid one.
    one_line_error(meshline("dag", DEMO, "--set", "stages.dedup.treshold=0.8"), 2, "treshold")
    unknown = meshline("run", DEMO, "--stage", "foo", "--set", f"root={tmp_path}")
    one_line_error(unknown, 2, "--stage foo: no such stage; this config has demo_corpus")
    one_line_error(meshline("run", DEMO, "--set", "stages"), 2, "--set 'stages': expected")
    one_line_error(meshline("status", "nope.yaml"), 2, "nope.yaml: no such config file")
    cluster = ["--set", f"root={tmp_path}", "--set", f"ray_address=127.0.0.1:{free_port()}"]
    one_line_error(meshline("run", DEMO, *cluster), 2, "cannot reach the Ray cluster at 127.0.0.1")
    assert not Path(tmp_path, "mlflow.db").exists()
    no_key = subprocess.run(
        [MESHLINE, "status", DEMO, "--set", "root=gs://bucket/x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"},
            "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json"),
        },
    )
    one_line_error(no_key, 2, f"GCS credentials: File {tmp_path / 'key.json'} was not found")
    debug = meshline("run", DEMO, "--stage", "foo", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_failed_stage_is_one_line_and_its_log_keeps_the_traceback(tmp_path):
    config = tmp_path / "failing.yaml"
    url = f"http://127.0.0.1:{free_port()}/x.jsonl"
    config.write_text(
        f"name: failing\nroot: {tmp_path}\nstages:\n  download: {{sources: [{url}], retries: 0}}\n"
    )
    failed = meshline("run", str(config))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    said = re.search(r"download: FAILED: (.+) \(the traceback: (\S+)\)", failed.stderr)
    assert said and "x.jsonl" in said.group(1), failed.stderr
    kept = Path(said.group(2)).read_text()
    assert "Traceback (most recent call last)" in kept and "x.jsonl" in kept
    assert "download   FAILED" in failed.stdout


def test_a_private_hub_repo_downloads_with_a_token_that_never_shows(tmp_path):
    token = "hf_cliSECRETtoken42"
    data = encoded([pile_record(f"private document {i}") for i in range(9)], ".jsonl.zst")
    config = tmp_path / "private.yaml"
    root = str(tmp_path / "out")
    with HubServer(tmp_path / "hub").running() as hub:
        hub.push("org/private", {"train/00.jsonl.zst": data, "README.md": b"x"}, token=token)
        config.write_text(
            f"name: private\nroot: {root}\nstages:\n  download:\n"
            f"    hf_endpoint: {hub.url}\n"
            "    sources: [hf://datasets/org/private/train/*.jsonl.zst]\n"
        )
        run = meshline("run", str(config), env={"HF_TOKEN": token, "HF_HOME": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    report = status(str(config), root)["download"]
    assert Path(report["output"], "train/00.jsonl.zst").read_bytes() == data
    assert {auth for path, auth in hub.requests} == {f"Bearer {token}"}
    produced = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(report["mlflow_run_id"])
    shown = [run.stdout, run.stderr, Path(report["output"], LOG_FILE).read_text()]
    shown += [json.dumps(produced.data.params), json.dumps(produced.data.tags)]
    shown += [d.dataset.source for d in produced.inputs.dataset_inputs]
    assert "hf://datasets/org/private@" in shown[-1]
    assert not any(token in text for text in shown)


@pytest.fixture
def slow_mirror(tmp_path) -> Iterator[tuple[str, FileServer]]:
    """A small demo corpus behind a slow HTTP mirror, and a config that downloads it one
    file at a time, so that a run can be killed half-way."""
    mirror = str(tmp_path / "mirror")
    names = build_demo_corpus(mirror, DemoCorpusConfig(max_text_mb=4, train_shards=4))
    server = FileServer(mirror)
    server.misbehave.bytes_per_second = 300_000
    config = tmp_path / "slow.yaml"
    with server.running():
        sources = json.dumps(names)
        config.write_text(
            "name: slow\nstages:\n  download:\n"
            f"    base_url: {server.url}/\n    checksums: {CHECKSUMS}\n"
            f"    concurrency: 1\n    sources: {sources}\n"
        )
        yield str(config), server


def wait_for_units(root: str, count: int, process: subprocess.Popen) -> list[dict]:
    """Poll the ledger until ``count`` units are committed (the run must still be going)."""
    pattern = os.path.join(root, "download-*", "_meta", "units", "*.json")
    while len(glob.glob(pattern)) < count:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    return [read_json(path) for path in glob.glob(pattern)]


def assert_resumed_exactly(config: str, root: str, server: FileServer, before: list[dict]):
    report = status(config, root)["download"]
    assert report["state"] == "DONE"
    expected = mirror_files(server.root)
    assert output_files(report["output"], expected) == expected
    for record in before:
        name = record["name"]
        requests = [r for r in server.requests if r.path == f"/{name}"]
        assert len(requests) == 1, f"{name} was fetched again after its commit"
        path = os.path.join(report["output"], "_meta", "units", name.replace("/", "__") + ".json")
        assert read_json(path)["committed_at"] == record["committed_at"]


def test_killing_the_driver_then_rerunning_resumes(slow_mirror, tmp_path):
    config, server = slow_mirror
    root = str(tmp_path / "root")
    driver = subprocess.Popen(
        [MESHLINE, "run", config, "--set", f"root={root}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    committed = wait_for_units(root, 2, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert status(config, root)["download"]["state"] in ("PENDING", "RUNNING")

    rerun = meshline("run", config, "--set", f"root={root}")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_resumed_exactly(config, root, server, committed)


def test_killing_the_stage_actor_is_survived(slow_mirror, tmp_path):
    config, server = slow_mirror
    root = str(tmp_path / "root")
    driver = subprocess.Popen(
        [MESHLINE, "run", config, "--set", f"root={root}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    committed = wait_for_units(root, 2, driver)
    [status_file] = glob.glob(os.path.join(root, "download-*", "_meta", "status.json"))
    actor_pid = read_json(status_file)["pid"]
    assert actor_pid != driver.pid
    os.kill(actor_pid, signal.SIGKILL)
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, output
    assert read_json(status_file)["pid"] != actor_pid
    assert_resumed_exactly(config, root, server, committed)


def wait_for_port(port: int, process: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    while True:
        assert process.poll() is None, "ray start --head exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() < deadline, f"nothing listens on {port}"
            time.sleep(0.2)


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A real ``ray start --head`` on 127.0.0.1 (token authentication on, as by default);
    yields its dashboard address for the Jobs API."""
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [
            "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--num-cpus=2", "--include-dashboard=true", *own_ports(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(dashboard, head)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)


def test_submit_runs_the_demo_download_on_a_ray_head(ray_head, tmp_path):
    root = str(tmp_path / "root")
    result = meshline(
        "submit",
        DEMO,
        "--address",
        ray_head,
        "--wait",
        "--stage",
        "download",
        "--set",
        f"root={root}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stdout
    assert status(DEMO, root)["download"]["state"] == "DONE"


def test_lint_is_clean():
    check = subprocess.run(
        [sys.executable, "-m", "ruff", "check", REPO], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", REPO], capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


def test_ui_serves_the_pipeline_store_on_loopback(tmp_path):
    root = str(tmp_path / "root")
    port = free_port()
    ui = subprocess.Popen(
        [MESHLINE, "ui", DEMO, "--set", f"root={root}", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, ui)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
        assert b"MLflow" in page or b"mlflow" in page
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def test_submit_to_a_remote_cluster_needs_shared_storage(tmp_path):
    remote = "http://head.cluster.invalid:8265"
    refused = meshline("submit", DEMO, "--address", remote, "--set", f"root={tmp_path}")
    assert refused.returncode == 2
    assert "remote cluster" in refused.stderr and "use gs://" in refused.stderr
    assert "use an MLflow server" in refused.stderr
    shared = ["--set", "root=gs://bucket/x", "--set", "tracking_uri=http://mlflow.invalid:5000"]
    accepted = meshline("submit", DEMO, "--address", remote, *shared, timeout=120)
    assert accepted.returncode == 2 and "remote cluster" not in accepted.stderr
    assert "cannot reach a Ray dashboard at http://head.cluster.invalid:8265" in accepted.stderr
    assert "Traceback" not in accepted.stderr


LIGHT = """
import sys
from pipeline.cli import main
for command in ("status", "dag"):
    assert main([command, sys.argv[1], "--set", "root=" + sys.argv[2]]) == 0
print("HEAVY", sorted({"jax", "mlflow", "orbax", "torch"} & set(sys.modules)))
"""


def test_status_and_dag_load_neither_jax_nor_mlflow(tmp_path):
    """What keeps them fast: the config classes, the CLI and the stage registry import
    without JAX, Orbax, MLflow (seconds of start-up); only running a stage loads them."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT, DEMO, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HEAVY []" in done.stdout, done.stdout[-2000:]
