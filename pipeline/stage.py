"""What a stage is: a frozen typed config, its upstream stages, and a function of its inputs.

Stage modules register themselves with ``@register``; the executor knows stages only
through this registry, never through their internals.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline import storage
from pipeline.ledger import META_DIR, Ledger


def resolved_config_path(output: str) -> str:
    """Where the executor records a stage output's resolved config and the upstream outputs
    it read (``{"stage", "fingerprint", "config", "inputs": [{"stage", "uri", ...}]}``)."""
    return storage.join(output, META_DIR, "config.json")


def read_resolved_config(output: str) -> dict[str, Any] | None:
    """The record at ``resolved_config_path(output)``, or None if there is none."""
    path = resolved_config_path(output)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def recorded_upstream_uri(output: str, stage: str) -> str | None:
    """The output of upstream ``stage`` that ``output`` was produced from, as the executor
    recorded it (for tools handed an output path outside a pipeline run); None if unknown."""
    recorded = read_resolved_config(output) or {}
    uris = [u["uri"] for u in recorded.get("inputs", []) if u.get("stage") == stage]
    return uris[0] if uris else None


def metric_name(text: str) -> str:
    """``text`` (a metric key that may hold a component or task name) as MLflow accepts it."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


class StageConfig(BaseModel):
    """Base of every stage's config: frozen, unknown keys rejected, documented fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    volatile_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields that change how a stage runs but not what it produces (worker counts,
    progress): left out of the fingerprint so tuning them reuses finished outputs."""

    def check_inputs(self, inputs: tuple[str, ...]) -> None:
        """Raise ValueError when this config cannot run on the upstream stages ``inputs``
        (the stage's optional inputs decide what it needs); checked when a config loads."""

    def fingerprint_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.volatile_fields))


@dataclass(frozen=True)
class Upstream:
    """A finished upstream stage output, as a downstream stage sees it."""

    stage: str
    uri: str
    fingerprint: str
    digest: str
    """Content digest of the upstream output (its ledger), recorded for STALE detection."""
    run_id: str = ""
    """The MLflow run that produced the output ("" where none is known)."""
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The upstream stage's resolved config, as ``model_dump(mode="json")`` gives it."""

    def record(self) -> dict[str, str]:
        """What a downstream output's ``config.json`` keeps of this upstream."""
        return {k: getattr(self, k) for k in ("stage", "uri", "fingerprint", "digest", "run_id")}


@dataclass(frozen=True)
class Source:
    """An external input a stage read (a downloaded file), recorded as lineage."""

    name: str
    uri: str
    digest: str


@dataclass
class StageContext:
    """Everything a stage's run function gets from the executor."""

    name: str
    config: StageConfig
    output: str
    """The stage's output directory ``{root}/{stage}-{fingerprint}``."""
    inputs: dict[str, Upstream]
    """Upstream stage name -> its finished output (an optional input only when configured)."""
    ledger: Ledger
    compilation_cache: str | None = None
    """Where compiled programs are kept across processes and runs (None: not kept)."""
    metric_sink: Callable[[dict[str, float]], None] = lambda metrics: None
    """Where ``log_metrics`` sends metrics (the stage's MLflow run)."""
    log_sources: Callable[[list[Source]], None] = lambda sources: None
    """Record external inputs (beyond upstream stages) as MLflow input datasets."""
    log_artifact: Callable[[str, str], None] = lambda local_path, artifact_dir: None
    """Copy a local file into the stage's MLflow run, under ``artifact_dir``."""
    register_model: Callable[[str | None, str, str | None, dict[str, str]], str] = (
        lambda name, source, run_id, tags: ""
    )
    """``(name, source, run_id, tags) -> version``: register ``source`` (a model directory
    URI) as a new version of model ``name`` (None: the pipeline's name) in the MLflow Model
    Registry, linked to run ``run_id``; returns the version ("" where nothing is tracked)."""
    publish_scores: Callable[[str, dict[str, float]], None] = lambda run_id, scores: None
    """``(run_id, scores)``: eval scores of the model trained in MLflow run ``run_id``, carried
    as tags by every registered version of that model, whether registered before or after."""
    node_metrics: Callable[[str], AbstractContextManager[object]] = lambda node: nullcontext()
    """``with node_metrics(node):`` samples the node the calling process runs on (CPU,
    memory, GPUs) into the stage's MLflow run as ``system/{node}/...``: for work the stage
    spreads over other processes and nodes (training hosts). Picklable."""
    metrics: dict[str, float] = field(default_factory=dict)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log a set of measurements (one step of a curve) under MLflow-safe names."""
        self.metric_sink({metric_name(k): v for k, v in metrics.items()})

    def record(self, **metrics: float) -> None:
        """Log final measurements of this stage (kept in status and MLflow)."""
        clean = {metric_name(k): v for k, v in metrics.items()}
        self.metrics.update(clean)
        self.metric_sink(clean)


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[StageConfig]
    inputs: tuple[str, ...]
    """Stages whose outputs this stage reads; each must be configured."""
    run: Callable[[StageContext], None]
    optional_inputs: tuple[str, ...] = ()
    """Stages this stage reads when the pipeline configures them (download reads the demo
    corpus stage's mirror)."""
    num_cpus: float = 0
    """CPUs the stage actor reserves; its Ray tasks and pools reserve their own."""

    def upstream(self, configured: Collection[str]) -> tuple[str, ...]:
        """The stages this one reads in a pipeline that configures ``configured``."""
        return self.inputs + tuple(s for s in self.optional_inputs if s in configured)


REGISTRY: dict[str, StageSpec] = {}


def register(
    name: str,
    config_cls: type[StageConfig],
    inputs: tuple[str, ...] = (),
    optional_inputs: tuple[str, ...] = (),
) -> Callable[[Callable[[StageContext], None]], Callable[[StageContext], None]]:
    """Register the decorated function as stage ``name`` reading the outputs of ``inputs``
    (and of ``optional_inputs`` where configured)."""

    def wrap(fn: Callable[[StageContext], None]) -> Callable[[StageContext], None]:
        REGISTRY[name] = StageSpec(name, config_cls, inputs, fn, optional_inputs)
        return fn

    return wrap


def fingerprint(config: StageConfig, upstream_fingerprints: list[str]) -> str:
    """Hash of the stage's own config and its upstream fingerprints (not the code)."""
    payload = json.dumps(
        {"config": config.fingerprint_fields(), "upstream": upstream_fingerprints},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
