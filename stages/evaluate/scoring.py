"""Scoring one model on every task: each task's result is a ledger unit of its own, and the
model is loaded only if some task is unfinished.

Units (files under the stage output): ``task/{label}`` -> ``tasks/{label}.json`` with one
task's metrics on the final checkpoint (``task/bits_per_byte``: one record per held-out
component and the overall ``pile``), and ``initial/task/{label}`` ->
``initial/tasks/{label}.json`` for the initial model. A task that fails is logged and
remembered in ``Scorer.failures``; the others are still scored.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

from pipeline.stage import StageContext
from stages.evaluate.config import FINAL, TaskSpec
from stages.evaluate.lm import JaxLM
from stages.evaluate.report import bare_metric
from stages.evaluate.tasks import (
    TaskResult,
    evaluate_bits_per_byte,
    evaluate_task,
    load_documents,
)
from stages.tokenize import Tokenizer
from stages.train.model_config import ModelConfig
from stages.train.params import Params

log = logging.getLogger(__name__)

BITS_PER_BYTE = "bits_per_byte"


def task_unit(model: str, label: str) -> tuple[str, str]:
    """Ledger unit and file of one task's result for ``model`` (final or initial)."""
    prefix = "" if model == FINAL else f"{model}/"
    return f"{prefix}task/{label}", f"{prefix}tasks/{label}.json"


def pile_task(component: str) -> str:
    """lm-eval's task name for a Pile component: ``DM Mathematics`` -> ``pile_dm-mathematics``."""
    return "pile_" + re.sub(r"[^a-z0-9]+", "-", component.lower()).strip("-")


def result_record(
    result: TaskResult, documents: int, spec: TaskSpec | None, output: str
) -> dict[str, Any]:
    """What a task unit stores: its metrics and where its documents came from (relative to
    the stage output when generated there, so the bytes do not depend on the root)."""
    source = None if spec is None else spec.source
    if source is not None and source.startswith(output.rstrip("/") + "/"):
        source = source[len(output.rstrip("/")) + 1 :]
    return {
        "task": result.task if spec is None else spec.label,
        "format": result.task if spec is None else spec.name,
        "source": source,
        "documents": documents,
        "samples": result.samples,
        # Sorted as the stored JSON is, so a reloaded record writes the same results.json.
        "metrics": dict(sorted(result.metrics.items())),
    }


def _summary(metrics: dict[str, float]) -> str:
    shown = [f"{bare_metric(k)} {v:.4g}" for k, v in metrics.items() if "stderr" not in k]
    return ", ".join(shown)


class Scorer:
    """Scores every task of one model (``FINAL`` or ``INITIAL``), loading the model only if
    some task is unfinished."""

    def __init__(
        self,
        ctx: StageContext,
        model: str,
        load: Callable[[], tuple[ModelConfig, Params]],
        tokenizer: Tokenizer,
        batch_size: int,
        max_length: int | None,
    ):
        self.ctx, self.model, self._load = ctx, model, load
        self._lm_options = (tokenizer, batch_size, max_length)
        self.failures: list[str] = []

    @cached_property
    def weights(self) -> tuple[ModelConfig, Params]:
        """The model's config and params, loaded on first use."""
        loaded = self._load()
        log.info("evaluate: [%s] model loaded", self.model)
        return loaded

    @cached_property
    def lm(self) -> JaxLM:
        return JaxLM(*self.weights, *self._lm_options)

    def task(self, spec: TaskSpec) -> list[dict[str, Any]]:
        """The committed or newly computed result of one task ([] if it failed)."""
        unit_name, path = task_unit(self.model, spec.label)
        if self.ctx.ledger.is_committed(unit_name):
            return [self.ctx.ledger.read_json(path)]
        lm = self.lm
        started = time.perf_counter()
        # Any error of one task is reported with it and raised once the others are done.
        try:
            docs = load_documents(spec.name, spec.source)
            result = evaluate_task(lm, spec.name, docs, spec.limit)
            record = result_record(result, len(docs), spec, self.ctx.output)
        except Exception as error:
            where = spec.source or "the Hugging Face hub"
            self.failures.append(f"{self.model} {spec.label} ({where}): {error}")
            log.error("evaluate: [%s] %s failed: %s", self.model, spec.label, error)
            return []
        self.ctx.ledger.commit_json(unit_name, path, record, sort_keys=True)
        log.info(
            "evaluate: [%s] %s: %d docs, %s (%.1fs)",
            self.model,
            spec.label,
            record["samples"],
            _summary(record["metrics"]),
            time.perf_counter() - started,
        )
        return [record]

    def bits_per_byte(self, texts: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Per-component and overall bits per byte (one unit)."""
        unit_name, path = task_unit(self.model, BITS_PER_BYTE)
        if self.ctx.ledger.is_committed(unit_name):
            return self.ctx.ledger.read_json(path)
        lm = self.lm
        started = time.perf_counter()
        named = {pile_task(component): docs for component, docs in texts.items()}
        results = evaluate_bits_per_byte(lm, named)
        documents = {"pile": sum(len(docs) for docs in named.values())}
        documents.update({name: len(docs) for name, docs in named.items()})
        records = [result_record(r, documents[r.task], None, self.ctx.output) for r in results]
        self.ctx.ledger.commit_json(unit_name, path, records, sort_keys=True)
        for record in records:
            log.info(
                "evaluate: [%s] %s: %s", self.model, record["task"], _summary(record["metrics"])
            )
        log.info("evaluate: [%s] bits per byte in %.1fs", self.model, time.perf_counter() - started)
        return records

    def score(
        self, specs: Sequence[TaskSpec], texts: dict[str, list[str]] | None
    ) -> list[dict[str, Any]]:
        """Every task's record, in config order, bits per byte last."""
        records = [record for spec in specs for record in self.task(spec)]
        if texts:
            records.extend(self.bits_per_byte(texts))
        return records
