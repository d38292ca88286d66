"""MLflow lineage: an experiment per pipeline, a parent run per ``meshline run``, a child
run per stage.

The driver creates the store, the experiment and the parent run before any stage starts
(SQLite has one writer at a time); afterwards only stage actors write, each to its own
child run. A child run carries the stage's flattened config as params, its fingerprint
and output URI as tags, every upstream output as an input dataset whose digest is our
content digest, and the stage's measurements as metrics. A stage may register a model
directory it wrote in the Model Registry.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModel,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.exceptions import MlflowException
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import get_external_mlflow_model_spec
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_MODEL_IS_EXTERNAL,
    MLFLOW_PARENT_RUN_ID,
)

from pipeline.secrets import redact_url as _redact_url
from pipeline.stage import Source, Upstream, metric_name

TAG_STAGE = "meshline.stage"
TAG_FINGERPRINT = "meshline.fingerprint"
TAG_OUTPUT = "meshline.output_uri"
TAG_REUSED = "meshline.reused"
TAG_REUSED_FROM = "meshline.reused_from_run_id"
TAG_DIGEST = "meshline.output_digest"
TAG_INVOCATION = "meshline.invocation"
TAG_REGISTERED_BY = "meshline.registered_by_run_id"
TAG_SOURCE = "meshline.source"
TAG_SCORES_FOR = "meshline.scores_for_run_id"
"""On an evaluate run: the run that trained the model its score tags are of."""
SCORE_TAG = "meshline.score."
"""Prefix of the tags carrying eval scores, on evaluate runs and registered model versions."""
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"
TAG_NOTE = "mlflow.note.content"
"""The run's description in the MLflow UI (Markdown)."""
SYSTEM_METRICS_SECONDS = 5.0
"""How often a stage run samples its node's CPU, memory, disk, network (and GPU) use."""
INPUT_ATTEMPTS = 3
"""Tries of logging a run's input datasets (see ``_log_inputs``)."""
MAX_PARAM_CHARS = 6000
MLFLOW_DIGEST_CHARS = 32
"""MLflow caps dataset digests at 36 characters; the full sha256 goes in the profile."""
MASK = "***"
"""What stands in for a secret in MLflow params, tags and the recorded config."""
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api_?key)", re.IGNORECASE)


def redact(value: Any, key: str = "") -> Any:
    """A nested config with the values of secret-named keys and URL credentials redacted."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if _SECRET_KEY.search(key) and value:
        return MASK
    return redact_url(value) if isinstance(value, str) else value


def redact_url(text: str) -> str:
    """``text`` with URL credentials masked the way lineage masks secrets."""
    return _redact_url(text, MASK)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` with secrets and URL credentials redacted."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        elif _SECRET_KEY.search(key) and value:
            flat[path] = MASK
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[path] = redact_url(text)[:MAX_PARAM_CHARS]
    return flat


def create_experiment(tracking_uri: str, name: str, artifact_location: str) -> str:
    """Create (or find) the pipeline's experiment, tagged as model training; the driver
    calls this before stages."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={TAG_EXPERIMENT_KIND: TRAINING_KIND}
        )
    if experiment.tags.get(TAG_EXPERIMENT_KIND) != TRAINING_KIND:
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
    return experiment.experiment_id


def runs_page(ui_url: str, experiment_id: str | None, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs (or of one run) in its model-training
    view: MLflow 3's UI picks the view from the URL (or the browser's last choice), not from
    the experiment's tag, and would otherwise open the GenAI overview."""
    base = ui_url.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{TRAINING_VIEW}"
    page = f"{base}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}?{TRAINING_VIEW}" if run_id else f"{page}?{TRAINING_VIEW}"


def experiment_id(tracking_uri: str, name: str) -> str | None:
    """The id of experiment ``name`` in the store, None if it has none."""
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def end_run(client: MlflowClient, run_id: str, ok: bool) -> None:
    status = RunStatus.FINISHED if ok else RunStatus.FAILED
    client.set_terminated(run_id, RunStatus.to_string(status))


class StageRun:
    """One stage's child run; stage code logs metrics through ``log_metrics``."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self._step = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        step = self._step if step is None else step
        self._step = step + 1
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_sources(self, sources: list[Source]) -> None:
        datasets = [_dataset(s.name, s.uri, s.digest, {}, "source") for s in sources]
        self.client.log_inputs(self.run_id, datasets=datasets)

    def log_artifact(self, local_path: str, artifact_dir: str) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_dir)

    def register_model(
        self, name: str | None, source: str, run_id: str | None, tags: dict[str, str]
    ) -> str:
        """A new version of registered model ``name`` (created if new; None: the pipeline's
        name) for the model directory at ``source``, linked to run ``run_id`` (the one that
        trained it); returns the version number.

        The weights stay where they are: the version points at an MLflow external model, as
        MLflow 3 records models it does not store, with ``source`` in tag ``meshline.source``.
        A plain local path would be refused as a version source by an ``mlflow server``."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        name = name or self.client.get_experiment(experiment_id).name
        tags = {**tags, TAG_SOURCE: redact_url(source), TAG_REGISTERED_BY: self.run_id}
        model = self._external_model(experiment_id, name, run_id, tags)
        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        # The model's own location, not "models:/ID": a SQLite registry resolves that through
        # the process-global tracking URI, not this client's.
        version = self.client.create_model_version(
            name, model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id
        )
        if run_id:
            # After the version exists: an evaluate run publishing at the same moment then
            # either finds the version or has published before this search.
            for key, value in self._published_scores(run_id).items():
                self.client.set_model_version_tag(name, version.version, key, value)
        return str(version.version)

    def publish_scores(self, trained_by: str, scores: dict[str, float]) -> None:
        """Eval ``scores`` of the model trained in run ``trained_by``, as tags on this run
        and on every registered version of that model: those registered already, here, and
        those registered later, by ``register_model``."""
        tags = {f"{SCORE_TAG}{metric_name(k)}": f"{v:.6g}" for k, v in sorted(scores.items())}
        run_tags = [RunTag(k, v) for k, v in {**tags, TAG_SCORES_FOR: trained_by}.items()]
        self.client.log_batch(self.run_id, tags=run_tags)
        for version in self.client.search_model_versions(f"run_id = '{trained_by}'"):
            for key, value in tags.items():
                self.client.set_model_version_tag(version.name, version.version, key, value)

    def _published_scores(self, trained_by: str) -> dict[str, str]:
        """The score tags of the latest evaluate run that published scores for ``trained_by``."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        runs = self.client.search_runs(
            [experiment_id],
            f"tags.`{TAG_SCORES_FOR}` = '{trained_by}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        tags = runs[0].data.tags if runs else {}
        return {k: v for k, v in tags.items() if k.startswith(SCORE_TAG)}

    def _external_model(
        self, experiment_id: str, name: str, run_id: str | None, tags: dict[str, str]
    ) -> LoggedModel:
        external = {**tags, MLFLOW_MODEL_IS_EXTERNAL: "true"}
        model = self.client.create_logged_model(
            experiment_id, name, source_run_id=run_id, tags=external
        )
        # The registry needs an MLmodel file even for a model whose files live elsewhere.
        with tempfile.TemporaryDirectory() as tmp:
            get_external_mlflow_model_spec(model).save(os.path.join(tmp, MLMODEL_FILE_NAME))
            self.client.log_model_artifacts(model.model_id, tmp)
        return self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    def tag_digest(self, digest: str) -> None:
        self.client.set_tag(self.run_id, TAG_DIGEST, digest)


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, node: str | None = None) -> Iterator[None]:
    """Samples this process's node (CPU, memory, disk, network; GPUs where ``nvidia-ml-py``
    finds them) into run ``run_id`` while the block runs, as ``system/...`` metrics, or
    ``system/{node}/...`` where several nodes report to one run. A block shorter than one
    sampling interval still leaves a sample."""
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_METRICS_SECONDS, node_id=node, tracking_uri=tracking_uri
    )
    started = time.monotonic()
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        if time.monotonic() - started < SYSTEM_METRICS_SECONDS:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()


def _log_inputs(client: MlflowClient, run_id: str, datasets: list[DatasetInput]) -> None:
    """``log_inputs``, tried again when it fails: two stages reading one upstream (convert and
    evaluate both read train) log the same dataset at once, and MLflow's store inserts it
    twice (a unique constraint fails) where the second call would find it."""
    for attempt in range(INPUT_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException:
            if attempt == INPUT_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def _dataset(name: str, uri: str, digest: str, profile: dict, context: str) -> DatasetInput:
    """An MLflow input dataset whose digest is ours (MLflow's own hashes 10k rows)."""
    scheme = uri.partition("://")[0] if "://" in uri else "local"
    dataset = Dataset(
        name=name,
        digest=digest[:MLFLOW_DIGEST_CHARS],
        source_type={"gs": "gcs", "file": "local"}.get(scheme, scheme),
        source=json.dumps({"uri": redact_url(uri)}),
        profile=json.dumps({**profile, "digest": digest}),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _upstream_dataset(upstream: Upstream) -> DatasetInput:
    profile = {"stage": upstream.stage, "fingerprint": upstream.fingerprint}
    name = f"{upstream.stage}-{upstream.fingerprint}"
    return _dataset(name, upstream.uri, upstream.digest, profile, "input")


@dataclass(frozen=True)
class PipelineRun:
    """The parent run of one ``meshline run``; stage actors open child runs under it."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @classmethod
    def start(
        cls, tracking_uri: str, experiment_id: str, invocation: str, argv: str
    ) -> PipelineRun:
        tags = {TAG_INVOCATION: invocation, "meshline.command": redact_url(argv)}
        run = MlflowClient(tracking_uri).create_run(
            experiment_id, tags=tags, run_name=f"pipeline-{invocation}"
        )
        return cls(tracking_uri, experiment_id, run.info.run_id)

    def end(self, ok: bool, stages: dict[str, str | None]) -> None:
        """End the run, its description listing ``stages`` (name -> child run id, None
        for a stage that failed) with a link to each child run."""
        client = MlflowClient(self.tracking_uri)
        lines = [f"`meshline run` of {len(stages)} stage(s):", ""]
        for name, run_id in stages.items():
            page = runs_page("", self.experiment_id, run_id).lstrip("/") if run_id else None
            lines.append(f"- [{name}]({page})" if page else f"- {name}: failed")
        client.set_tag(self.run_id, TAG_NOTE, "\n".join(lines))
        end_run(client, self.run_id, ok)

    def _child(self, client: MlflowClient, stage: str, fingerprint: str, output: str) -> str:
        tags = {
            MLFLOW_PARENT_RUN_ID: self.run_id,
            TAG_STAGE: stage,
            TAG_FINGERPRINT: fingerprint,
            TAG_OUTPUT: redact_url(output),
        }
        return client.create_run(self.experiment_id, tags=tags, run_name=stage).info.run_id

    @contextmanager
    def stage_run(
        self,
        stage: str,
        fingerprint: str,
        output: str,
        config: dict[str, Any],
        inputs: list[Upstream],
    ) -> Iterator[StageRun]:
        """A child run that ends FINISHED when the block succeeds and FAILED when it raises."""
        client = MlflowClient(self.tracking_uri)
        run_id = self._child(client, stage, fingerprint, output)
        params = [Param(k, v) for k, v in sorted(flatten(config).items())]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        if inputs:
            _log_inputs(client, run_id, [_upstream_dataset(u) for u in inputs])
        try:
            with system_metrics(self.tracking_uri, run_id):
                yield StageRun(client, run_id)
        except BaseException:
            end_run(client, run_id, ok=False)
            raise
        end_run(client, run_id, ok=True)

    def log_reused(
        self, stage: str, fingerprint: str, output: str, producer_run_id: str | None
    ) -> str:
        """A child run for a stage that was already done: tagged reused, linked to its
        producer."""
        client = MlflowClient(self.tracking_uri)
        run_id = self._child(client, stage, fingerprint, output)
        tags = [RunTag(TAG_REUSED, "true"), RunTag(TAG_REUSED_FROM, producer_run_id or "")]
        client.log_batch(run_id, tags=tags)
        end_run(client, run_id, ok=True)
        return run_id

    def mark_killed(self, run_id: str) -> None:
        """End a child run whose runner died (found when a rerun takes over its lease)."""
        client = MlflowClient(self.tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
