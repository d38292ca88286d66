"""The typed pipeline config: YAML plus ``--set key=value`` overrides, validated.

Top-level fields are the pipeline's; ``stages.<name>`` is validated by that stage's own
config class from the stage registry. Every error names the file and the key path.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import storage
from pipeline.stage import REGISTRY, StageConfig


class ConfigError(ValueError):
    """A config that cannot be used, with the file and key path in the message."""


class PipelineConfig(BaseModel):
    """Settings of the whole pipeline (stage settings live in ``stages``)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, arbitrary_types_allowed=True
    )

    name: str
    """Pipeline name: the MLflow experiment every run of this config logs to."""
    root: str = "outputs"
    """Where every stage output lives: a local directory or a ``gs://`` prefix."""
    tracking_uri: str | None = None
    """MLflow tracking store; ``None`` means ``sqlite:///{root}/mlflow.db``."""
    ray_address: str | None = None
    """Ray cluster to join; ``None`` uses RAY_ADDRESS, else starts a local cluster."""
    lease_seconds: float = Field(default=60.0, gt=0)
    """A RUNNING status not renewed for this long is stale and may be taken over."""
    max_restarts: int = Field(default=2, ge=0)
    """How often Ray restarts a stage actor that died; the stage resumes from its ledger."""
    compilation_cache: str | None = "compilation-cache"
    """Where stages keep the programs they compile, so a restarted, resumed or repeated stage
    loads them instead of compiling again (JAX's persistent compilation cache); a relative
    path is under ``root``; null turns it off."""
    stage_modules: tuple[str, ...] = ("stages.all",)
    """Modules imported to register stages (a plugin adds its module here)."""
    stages: dict[str, StageConfig] = Field(default_factory=dict)
    """Stage name -> that stage's config; only the stages listed here are run."""

    def stage_root(self) -> str:
        return storage.absolute(self.root)

    def resolved_compilation_cache(self) -> str | None:
        cache = self.compilation_cache
        if cache is None or storage.is_gcs(cache) or os.path.isabs(cache):
            return cache
        return storage.join(self.stage_root(), cache)

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if storage.is_gcs(self.root):
            raise ConfigError("root is on gs://: set tracking_uri to an MLflow server")
        return "sqlite:///" + os.path.join(self.stage_root(), "mlflow.db")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as a YAML scalar or list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
        node = child
    node[path[-1]] = value


def _format_errors(source: str, prefix: tuple[Any, ...], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in (*prefix, *e["loc"]))
        lines.append(f"{source}: {where}: {e['msg']} (got {e['input']!r})")
    return "\n".join(lines)


def load_config(path: str, overrides: list[str] = ()) -> PipelineConfig:
    """Read ``path``, apply ``--set`` overrides and validate everything."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(data, *parse_override(item))
    return validate(data, source=path)


def validate(data: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    raw_stages = data.get("stages") or {}
    if not isinstance(raw_stages, dict):
        raise ConfigError(f"{source}: stages: must be a mapping of stage name to settings")
    top = {k: v for k, v in data.items() if k != "stages"}
    try:
        pipeline = PipelineConfig.model_validate(top)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, (), e)) from None
    for module in pipeline.stage_modules:
        importlib.import_module(module)
    stages: dict[str, StageConfig] = {}
    errors = []
    for name, settings in raw_stages.items():
        spec = REGISTRY.get(name)
        if spec is None:
            errors.append(f"{source}: stages.{name}: unknown stage (known: {sorted(REGISTRY)})")
            continue
        try:
            stages[name] = spec.config_cls.model_validate(settings or {})
        except ValidationError as e:
            errors.append(_format_errors(source, ("stages", name), e))
    for name, stage in stages.items():
        missing = [needed for needed in REGISTRY[name].inputs if needed not in raw_stages]
        errors.extend(
            f"{source}: stages.{name}: needs stage {n!r}, not configured" for n in missing
        )
        if any(needed not in stages for needed in REGISTRY[name].upstream(raw_stages)):
            # An input configured but invalid has its own error above; checking against it
            # would only add lines pointing at this stage.
            continue
        try:
            stage.check_inputs(REGISTRY[name].upstream(stages))
        except ValueError as e:
            errors.append(f"{source}: stages.{name}: {e}")
    if errors:
        raise ConfigError("\n".join(errors))
    return pipeline.model_copy(update={"stages": stages})
