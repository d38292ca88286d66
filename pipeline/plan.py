"""The stage graph of a pipeline config and each stage's state, read from the status files:
what ``meshline dag`` and ``meshline status`` show, without Ray, MLflow or the stages' heavy
libraries (the executor runs what this plans)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig
from pipeline.stage import REGISTRY, fingerprint
from pipeline.status import FAILED, RUNNING, SUCCESS, is_stale, read_status

DONE, STALE, PENDING = "DONE", "STALE", "PENDING"


@dataclass(frozen=True)
class PlannedStage:
    """A configured stage: what it reads, its fingerprint and its output directory."""

    name: str
    inputs: tuple[str, ...]
    fingerprint: str
    output: str


@dataclass(frozen=True)
class StageReport:
    """A stage's state as ``meshline status`` shows it."""

    stage: str
    state: str
    output: str
    fingerprint: str
    mlflow_run_id: str | None
    digest: str | None
    detail: str = ""


def plan(config: PipelineConfig) -> dict[str, PlannedStage]:
    """Every configured stage in dependency order, with its fingerprint and output dir."""
    planned: dict[str, PlannedStage] = {}
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in planned:
            return
        if name in visiting:
            raise ConfigError(f"stage graph has a cycle through {name!r}")
        visiting.add(name)
        inputs = REGISTRY[name].upstream(config.stages)
        for upstream in inputs:
            visit(upstream)
        fp = fingerprint(config.stages[name], [planned[u].fingerprint for u in inputs])
        output = storage.join(config.stage_root(), f"{name}-{fp}")
        planned[name] = PlannedStage(name, inputs, fp, output)

    for name in config.stages:
        visit(name)
    return planned


def select(planned: dict[str, PlannedStage], names: list[str]) -> list[str]:
    """The named stages plus everything upstream of them, in dependency order."""
    unknown = [n for n in names if n not in planned]
    if unknown:
        raise ConfigError(
            f"--stage {', '.join(unknown)}: no such stage; this config has {', '.join(planned)}"
        )
    wanted: set[str] = set()
    stack = list(names or planned)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(planned[name].inputs)
    return [n for n in planned if n in wanted]


def report(config: PipelineConfig) -> list[StageReport]:
    """The state of every stage, read from the status files (no Ray needed)."""
    reports: dict[str, StageReport] = {}
    for name, stage in plan(config).items():
        status = read_status(stage.output)
        state, detail = PENDING, ""
        if status is None:
            detail = "not started"
        elif status.state == RUNNING:
            running = not is_stale(status, config.lease_seconds)
            state = RUNNING if running else PENDING
            detail = f"pid {status.pid} on {status.host}" if running else "interrupted"
        elif status.state == FAILED:
            state, detail = FAILED, (status.error or "").strip().rpartition("\n")[2]
        else:
            upstream = {u: reports[u] for u in stage.inputs}
            changed = [u for u, r in upstream.items() if status.inputs.get(u) != r.digest]
            blocked = [u for u, r in upstream.items() if r.state != DONE]
            state = STALE if changed or blocked else DONE
            if changed:
                detail = f"upstream changed: {', '.join(changed)}"
            elif blocked:
                detail = f"upstream not done: {', '.join(blocked)}"
        reports[name] = StageReport(
            name,
            state,
            stage.output,
            stage.fingerprint,
            status.mlflow_run_id if status else None,
            status.digest if status and status.state == SUCCESS else None,
            detail,
        )
    return list(reports.values())
