"""The pipeline against a real ``mlflow server`` over HTTP.

A test starts ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact root, both in
tmp), serves a tiny Pile-format mirror from a local HTTP server that demands Basic auth, and
runs ``meshline run`` (download, and the toy stages numbers -> total; each stage in its own
Ray actor logging to the server) with ``--set tracking_uri=http://127.0.0.1:PORT``. The
mirror's credentials are in the download config's ``base_url`` (``http://user:PASSWORD@...``),
as a user would put them.
Through ``MlflowClient`` over HTTP the test then finds the parent run, one child run per
stage, their params, metrics and dataset inputs; and the password appears nowhere in the
params, tags, dataset sources, the CLI's own output (stage actors' logs included), or the
server's log. A second test opens the page ``meshline ui`` prints in headless Chromium
(Debian's ``chromium``, which the README's test command installs): the runs page, in the
model-training view, lists the parent run, the parent run's page names every stage's child
run (its description links each), and a screenshot of it is saved (under
``$MESHLINE_TEST_ARTIFACTS`` if set).
``total`` registers its output in the Model Registry (as convert registers its export), and
the version is found over HTTP with its source and the producing run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zstandard
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import lineage
from tests.dedup_corpus import pile_line
from tests.httpserver import FileServer
from tests.mlflow_server import running_mlflow_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "s3cr3t-Xq9"
USER = "mirror-user"


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def mlflow_server(server_dir: Path) -> Iterator[str]:
    with running_mlflow_server(server_dir) as url:
        yield url


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Iterator[FileServer]:
    """A Pile-format mirror (two train files with duplicates, val, test) behind Basic auth."""
    tmp_path = tmp_path_factory.mktemp("mirror")
    files = {
        "train/00.jsonl": [f"document {i} " + "alpha beta gamma " * (i % 7 + 3) for i in range(40)],
        "train/01.jsonl": [f"document {i} " + "alpha beta gamma " * (i % 7 + 3) for i in range(20)],
        "val.jsonl": ["held out text one", "held out text two"],
        "test.jsonl": ["test text"],
    }
    root = tmp_path / "mirror"
    for name, texts in files.items():
        path = root / f"{name}.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(pile_line(t, "Github") for t in texts).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    server = FileServer(str(root))
    credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    server.misbehave.require_auth = f"Basic {credentials}"
    with server.running() as running:
        yield running


@pytest.fixture(scope="module")
def pipeline_output(tmp_path_factory, mlflow_server: str, mirror: FileServer) -> str:
    """``meshline run`` against the server; returns what it printed and the resolved
    configs it left in the outputs' metadata."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    base_url = mirror.url.replace("://", f"://{USER}:{PASSWORD}@") + "/"
    config = {
        "name": "mlflow-server-test",
        "root": str(tmp_path / "root"),
        "stage_modules": ["stages.download", "tests.toystages"],
        "stages": {
            "download": {
                "base_url": base_url,
                "sources": [
                    "train/00.jsonl.zst",
                    "train/01.jsonl.zst",
                    "val.jsonl.zst",
                    "test.jsonl.zst",
                ],
                "concurrency": 2,
            },
            "numbers": {"units": 2, "per_unit": 3},
            "total": {"scale": 2, "registered_model": "toy-model"},
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(path)]
        + ["--set", f"tracking_uri={mlflow_server}"],
        cwd=ROOT,
        env=dict(env, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert mirror.hits("/train/00.jsonl.zst") >= 1, "the mirror was not used"
    resolved = sorted((tmp_path / "root").glob("*/_meta/config.json"))
    assert resolved, "no resolved configs written"
    return output + "".join(p.read_text() for p in resolved)


def pipeline_runs(client: MlflowClient) -> tuple[object, dict]:
    """The pipeline's parent run and its child runs by stage."""
    experiment = client.get_experiment_by_name("mlflow-server-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {
        r.data.tags["meshline.stage"]: r
        for r in runs
        if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parents[0].info.run_id
    }
    return parents[0], children


def test_pipeline_logs_runs_params_metrics_and_datasets_over_http(
    pipeline_output: str, mlflow_server: str, mirror: FileServer, server_dir: Path
):
    client = MlflowClient(tracking_uri=mlflow_server)
    parent, children = pipeline_runs(client)
    assert set(children) == {"download", "numbers", "total"}
    assert all(r.info.status == "FINISHED" for r in children.values())

    download, numbers, total = (children[n] for n in ("download", "numbers", "total"))
    assert download.data.params["base_url"] == mirror.url.replace("://", "://***@") + "/"
    assert total.data.params["scale"] == "2"
    assert download.data.metrics["files"] == 4
    assert total.data.metrics["total"] == 2 * sum(range(6))
    history = client.get_metric_history(download.info.run_id, "files")
    assert [m.value for m in history] == [4]

    # total registered its output as a model version linked to numbers' run.
    (version,) = client.search_model_versions("name='toy-model'")
    assert version.run_id == numbers.info.run_id
    assert version.tags[lineage.TAG_SOURCE] == Path(total.data.tags[lineage.TAG_OUTPUT]).as_uri()
    (model,) = client.search_logged_models([parent.info.experiment_id])
    assert model.source_run_id == numbers.info.run_id
    assert model.tags[lineage.TAG_SOURCE] == version.tags[lineage.TAG_SOURCE]
    assert version.tags[lineage.TAG_REGISTERED_BY] == total.info.run_id
    assert version.tags[lineage.TAG_DIGEST] == total.data.tags[lineage.TAG_DIGEST]

    # total's input is numbers' output, with its digest; download's inputs are its sources.
    total_inputs = client.get_run(total.info.run_id).inputs.dataset_inputs
    assert [i.dataset.name.split("-")[0] for i in total_inputs] == ["numbers"]
    assert total_inputs[0].dataset.digest == numbers.data.tags["meshline.output_digest"][:32]
    sources = [i.dataset for i in client.get_run(download.info.run_id).inputs.dataset_inputs]
    assert len(sources) == 4

    # The password is nowhere: params, tags, dataset sources, CLI output, server log.
    logged = json.dumps(
        [
            [r.data.params, r.data.tags, [(d.name, d.source) for d in sources]]
            for r in [parent, *children.values()]
        ]
    )
    assert "***@127.0.0.1" in logged
    for where, text in {
        "mlflow": logged,
        "meshline output and resolved configs": pipeline_output,
        "server log": (server_dir / "server.log").read_text(errors="replace"),
    }.items():
        assert PASSWORD not in text, where


def browse(url: str, profile: Path, *args: str) -> str:
    """What headless Chromium prints for ``url`` after the page's scripts ran (up to a
    minute of the page's own virtual time)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        # Without these Chromium keeps dialling Google's hosts, refused on a closed network.
        + ["--disable-background-networking", "--disable-component-update", "--no-first-run"]
        + ["--disable-sync", "--disable-quic", f"--user-data-dir={profile}"]
        + ["--virtual-time-budget=60000", *args, url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def visible_text(html: str) -> str:
    body = html[html.find("<body") :]
    body = re.sub(r"<style.*?</style>|<script.*?</script>", " ", body, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def ui_url(mlflow_server: str, tmp_path: Path) -> str:
    """The page ``meshline ui`` prints for the test pipeline's server."""
    config = tmp_path / "ui.yaml"
    config.write_text(yaml.safe_dump({"name": "mlflow-server-test", "stages": {}}))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ui", str(config)]
        + ["--set", f"tracking_uri={mlflow_server}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().rpartition(": ")[2]


def test_ui_in_headless_chromium_shows_the_pipeline_runs(
    pipeline_output: str, mlflow_server: str, tmp_path: Path
):
    assert CHROMIUM, "needs Debian's chromium: the README's test command installs it"
    client = MlflowClient(tracking_uri=mlflow_server)
    parent, children = pipeline_runs(client)
    experiment = parent.info.experiment_id
    runs = f"{mlflow_server}/#/experiments/{experiment}/runs"
    printed = ui_url(mlflow_server, tmp_path)
    assert printed == f"{runs}?workflowType=machine_learning"
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    # The page opens on the training runs (the stages' runs nested under the pipeline's,
    # named on its page below), not on the GenAI overview.
    listing = visible_text(browse(printed, tmp_path / "profile", "--dump-dom"))
    assert parent.info.run_name in listing, listing[-3000:]
    assert f"{1 + len(children)} matching runs" in listing, listing[-3000:]
    assert "Judges" not in listing and "No data available" not in listing, listing[-3000:]
    # The parent run's description links each stage's run.
    note = parent.data.tags[lineage.TAG_NOTE]
    for name, child in children.items():
        link = f"#/experiments/{experiment}/runs/{child.info.run_id}?workflowType=machine_learning"
        assert f"[{name}]({link})" in note, note
    page_url = f"{runs}/{parent.info.run_id}"
    page = visible_text(browse(page_url, tmp_path / "profile", "--dump-dom"))
    # The parent run's page lists its child runs by name: "Child runs total , numbers , ...".
    shown = re.search(r"Child runs (.*?) Source", page)
    assert shown, page[-3000:]
    assert sorted(name.strip() for name in shown.group(1).split(",")) == sorted(children)
    assert PASSWORD not in page and PASSWORD not in listing
    artifacts = Path(os.environ.get("MESHLINE_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "mlflow-ui-pipeline-run.png"
    browse(page_url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1600,1000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
