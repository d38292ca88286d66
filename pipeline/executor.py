"""Plans the stage graph, decides what is done, and runs stages as restartable Ray actors.

Each stage runs in its own actor; the driver hands every actor the ObjectRefs of its
upstream stages' outcomes, so Ray resolves the graph and independent stages run at the
same time. The decision to reuse, resume or redo a stage is made inside its actor, once
its upstream digests are known:

- SUCCESS and the upstream digests it read equal the current ones: reused.
- SUCCESS with different upstream digests (STALE), or ``--force``: output discarded, redone.
- anything else (no status, FAILED, a RUNNING lease whose runner died): resumed from
  the ledger, so committed units are not redone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import lineage, loopback, storage
from pipeline.config import ConfigError, PipelineConfig
from pipeline.console import RunDisplay, run_display
from pipeline.ledger import Ledger
from pipeline.logs import LOG_FILE, console_logging, kept_log, last_line, quiet
from pipeline.plan import PlannedStage, plan, select
from pipeline.progress import ProgressBoard, reporting
from pipeline.raydata import quiet_ray_data, release_stranded_data_coordinator
from pipeline.secrets import redact_url
from pipeline.stage import REGISTRY, StageContext, Upstream, resolved_config_path
from pipeline.status import FAILED, RUNNING, SUCCESS, Lease, read_status

log = logging.getLogger("meshline")

TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's notice that a new local cluster has token authentication on."""
NODE_LOSS_RETRIES = 3
DISPLAY_SECONDS = 1.0
"""How often the driver redraws the stages' progress."""


@dataclass(frozen=True)
class Outcome:
    """What a stage actor returns: enough for downstream stages and the summary."""

    upstream: Upstream
    run_id: str
    reused: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Invocation:
    """One ``meshline run``: identifies its leases and links its MLflow runs."""

    id: str
    lineage: lineage.PipelineRun
    board: ActorHandle | None = None
    """Where the stages report their progress for the driver's display."""


@ray.remote
class StageActor:
    """Runs one stage. Ray restarts it if its process dies; the retried call resumes."""

    def __init__(self, config: PipelineConfig, verbose: bool = False):
        import importlib

        for module in config.stage_modules:
            importlib.import_module(module)
        self.config = config
        console_logging()
        if not verbose:
            quiet_ray_data()

    def execute(
        self, invocation: Invocation, stage: PlannedStage, force: bool, *upstream: Outcome
    ) -> Outcome:
        release_stranded_data_coordinator()
        return execute_stage(self.config, invocation, stage, force, [o.upstream for o in upstream])


def execute_stage(
    config: PipelineConfig,
    invocation: Invocation,
    stage: PlannedStage,
    force: bool,
    inputs: list[Upstream],
) -> Outcome:
    """Reuse, resume or redo one stage (see the module docstring)."""
    started = time.time()
    digests = {u.stage: u.digest for u in inputs}
    status = read_status(stage.output)
    ours = status is not None and status.invocation == invocation.id
    if status and status.state == SUCCESS and (ours or (not force and status.inputs == digests)):
        run_id = status.mlflow_run_id or ""
        if not ours:
            run_id = invocation.lineage.log_reused(
                stage.name, stage.fingerprint, stage.output, status.mlflow_run_id
            )
            log.info("%s: reused %s", stage.name, stage.output)
        upstream = _upstream(config, stage, status.digest or "", status.mlflow_run_id or "")
        return Outcome(upstream, run_id, not ours, time.time() - started, status.metrics)
    if status and not ours and (force or status.state == SUCCESS):
        log.info("%s: discarding %s (%s)", stage.name, stage.output, "forced" if force else "stale")
        storage.delete(stage.output, recursive=True)
    return _produce(config, invocation, stage, inputs, started)


def _produce(
    config: PipelineConfig,
    invocation: Invocation,
    stage: PlannedStage,
    inputs: list[Upstream],
    started: float,
) -> Outcome:
    spec = REGISTRY[stage.name]
    stage_config = config.stages[stage.name]
    lease = Lease(stage.output, invocation.id, config.lease_seconds).acquire()
    if lease.previous and lease.previous.state == RUNNING and lease.previous.mlflow_run_id:
        invocation.lineage.mark_killed(lease.previous.mlflow_run_id)
    lease.update(
        inputs={u.stage: u.digest for u in inputs},
        node=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
    )
    resolved = stage_config.model_dump(mode="json")
    _write_resolved_config(stage, resolved, inputs)
    try:
        with invocation.lineage.stage_run(
            stage.name, stage.fingerprint, stage.output, resolved, inputs
        ) as run:
            lease.update(mlflow_run_id=run.run_id)
            ledger = Ledger(stage.output)
            context = StageContext(
                name=stage.name,
                config=stage_config,
                output=stage.output,
                inputs={u.stage: u for u in inputs},
                ledger=ledger,
                compilation_cache=config.resolved_compilation_cache(),
                metric_sink=run.log_metrics,
                log_sources=run.log_sources,
                log_artifact=run.log_artifact,
                register_model=run.register_model,
                publish_scores=run.publish_scores,
                node_metrics=functools.partial(
                    lineage.system_metrics, invocation.lineage.tracking_uri, run.run_id
                ),
            )
            with kept_log(stage.output, run.log_artifact), reporting(invocation.board, stage.name):
                log.info("%s: producing %s", stage.name, stage.output)
                _run_through_node_losses(spec.run, context)
            digest = ledger.digest()
            run.tag_digest(digest)
    except BaseException:
        lease.release(FAILED, error=traceback.format_exc(limit=5))
        raise
    lease.release(SUCCESS, digest=digest, metrics=context.metrics)
    upstream = _upstream(config, stage, digest, run.run_id)
    return Outcome(upstream, run.run_id, False, time.time() - started, context.metrics)


def _upstream(config: PipelineConfig, stage: PlannedStage, digest: str, run_id: str) -> Upstream:
    """A finished stage as its downstream stages see it."""
    resolved = config.stages[stage.name].model_dump(mode="json")
    return Upstream(stage.name, stage.output, stage.fingerprint, digest, run_id, resolved)


def _run_through_node_losses(run: Callable[[StageContext], None], context: StageContext) -> None:
    """``run(context)``, run again when it fails because the cluster lost a node under it (a
    Ray Data step that started before the GCS saw the node go: its coordinator or actors are
    unschedulable). The stage resumes from its ledger, as after any kill; a stranded Ray Data
    coordinator is replaced first. At most ``NODE_LOSS_RETRIES`` times, then the error stands."""
    for attempt in range(1, NODE_LOSS_RETRIES + 2):
        try:
            return run(context)
        except (ray.exceptions.ActorUnschedulableError, ray.exceptions.NodeDiedError) as error:
            if attempt > NODE_LOSS_RETRIES:
                raise
            log.warning(
                "%s: a node was lost under it (%s); resuming, retry %d of %d",
                context.name,
                type(error).__name__,
                attempt,
                NODE_LOSS_RETRIES,
            )
            release_stranded_data_coordinator()


def _write_resolved_config(stage: PlannedStage, config: dict, inputs: list[Upstream]) -> None:
    payload = {
        "stage": stage.name,
        "fingerprint": stage.fingerprint,
        # Kept for people reading the output; credentials stay out of it as out of MLflow.
        "config": lineage.redact(config),
        "inputs": [u.record() for u in inputs],
    }
    storage.write_atomic(resolved_config_path(stage.output), json.dumps(payload, indent=1).encode())


def connect(config: PipelineConfig) -> None:
    """Join the configured cluster (or RAY_ADDRESS), else start a local one."""
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(address)
    if address != "local":
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # A local cluster gets its dashboard (on loopback, a free port): Ray's state API runs in
    # it, and Ray Train's placement group cleaner polls that API, warning every second
    # while it cannot. Ray turns token authentication on for it (as we want) with a warning
    # saying so at every start, which is kept off the console.
    with quiet(TOKEN_NOTICE_LOGGER):
        ray.init(
            address=address,
            include_dashboard=True,
            dashboard_host=loopback.HOST,
            dashboard_port=loopback.free_port(),
            logging_level=logging.WARNING,
        )


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``ConfigError`` naming ``address`` when nothing listens there: ``ray.init`` would
    retry an unreachable GCS for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "local", "auto": Ray finds or starts the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(
            f"cannot reach the Ray cluster at {redact_url(address)} (ray_address or "
            f"RAY_ADDRESS): {error}"
        ) from None


def run_pipeline(
    config: PipelineConfig,
    stages: list[str],
    force: bool,
    command: str,
    verbose: bool = False,
    debug: bool = False,
) -> dict[str, Outcome | BaseException]:
    """Run the selected stages (and what they need); returns each stage's outcome or error.
    ``verbose``: Ray Data's own progress output too; ``debug``: failed stages' tracebacks."""
    planned = plan(config)
    order = select(planned, stages)
    forced = set(stages or order) if force else set()
    tracking_uri = config.resolved_tracking_uri()
    connect(config)
    if not storage.is_gcs(config.root):
        os.makedirs(config.stage_root(), exist_ok=True)
    artifacts = storage.join(config.stage_root(), "mlartifacts")
    experiment_id = lineage.create_experiment(tracking_uri, config.name, artifacts)
    invocation_id = uuid.uuid4().hex[:12]
    parent = lineage.PipelineRun.start(tracking_uri, experiment_id, invocation_id, command)
    # On the driver's node, so that losing another node never loses the display.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    board = ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()
    invocation = Invocation(invocation_id, parent, board)
    refs: dict[str, ray.ObjectRef] = {}
    for name in order:
        actor = StageActor.options(
            num_cpus=REGISTRY[name].num_cpus,
            max_restarts=config.max_restarts,
            # Retry the call for as long as Ray may restart the actor: counted retries ran out
            # while the GCS had not yet noticed a killed node, failing the stage.
            max_task_retries=-1,
            # Stage actors live as long as their stage and do its in-process work (training
            # hosts, export, scoring): spread them rather than stack them on the driver's node.
            scheduling_strategy="SPREAD",
        ).remote(config, verbose)
        upstream_refs = [refs[u] for u in planned[name].inputs]
        refs[name] = actor.execute.remote(invocation, planned[name], name in forced, *upstream_refs)
    with run_display(order) as display:
        results = _collect(refs, planned, debug, display, board)
    ray.kill(board)
    ok = all(isinstance(r, Outcome) for r in results.values())
    parent.end(ok, {n: r.run_id if isinstance(r, Outcome) else None for n, r in results.items()})
    return results


def _collect(
    refs: dict[str, ray.ObjectRef],
    planned: dict[str, PlannedStage],
    debug: bool,
    display: RunDisplay,
    board: ActorHandle,
) -> dict[str, Outcome | BaseException]:
    """Wait for every stage, showing their progress and logging each as it ends; failures do
    not stop the others. A failure is its error's last line, and where its log is (the whole
    error with ``debug``)."""
    names = {ref: name for name, ref in refs.items()}
    results: dict[str, Outcome | BaseException] = {}
    pending = list(refs.values())
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=DISPLAY_SECONDS)
        if not done:
            try:
                display.show(ray.get(board.snapshot.remote(), timeout=DISPLAY_SECONDS * 10))
            except (ray.exceptions.RayError, TimeoutError) as error:
                log.debug("progress display skipped a redraw: %s", error)
            continue
        name = names[done[0]]
        try:
            outcome = ray.get(done[0])
        except ray.exceptions.RayError as error:
            results[name] = error
            upstream_failed = any(
                isinstance(results.get(u), BaseException) for u in planned[name].inputs
            )
            display.state(name, "not run" if upstream_failed else "FAILED")
            if not upstream_failed:
                where = storage.join(planned[name].output, LOG_FILE)
                detail = str(error) if debug else f"{last_line(error)} (the traceback: {where})"
                log.error("%s: FAILED: %s", name, detail)
            continue
        results[name] = outcome
        verb = "reused" if outcome.reused else "done"
        display.state(name, verb)
        log.info("%s: %s in %.1fs -> %s", name, verb, outcome.seconds, outcome.upstream.uri)
    return {name: results[name] for name in refs}
