"""What the evaluate stage reports: ``results.json`` in lm-eval's layout (the ``results``
unit, also logged to MLflow), MLflow's flat scores, which scores improved on the initial
model, and the table beside the published numbers.

Plain Python over the task records the scorer commits (``scoring.result_record``), so the
stage registers without loading JAX.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from pipeline.stage import StageContext
from stages.evaluate.config import FINAL, INITIAL
from stages.evaluate.published import GPT3_CURIE, GPTJ_6B, published

TABLE_FILE = "table.txt"
"""The scores beside the published ones, as text (``meshline run`` prints it at its end)."""
RESULTS_UNIT = "results"
HIGHER_IS_BETTER = {
    "acc": True,
    "acc_norm": True,
    "perplexity": False,
    "word_perplexity": False,
    "byte_perplexity": False,
    "bits_per_byte": False,
}
"""Direction of every score the tasks report (stderr values are not scores)."""
TASK_VERSION = 1.0
"""lm-eval's ``metadata.version`` of every task implemented here (v0.4.x)."""


def bare_metric(key: str) -> str:
    """The metric of an lm-eval result key: ``acc,none`` -> ``acc`` (``acc`` is kept)."""
    return key.split(",")[0]


def results_json(records: Sequence[dict[str, Any]], model_args: str) -> dict[str, Any]:
    """The records in the layout of lm-eval's ``results.json``."""
    names = [r["task"] for r in records]
    return {
        "results": {r["task"]: {"alias": r["task"], **r["metrics"]} for r in records},
        "group_subtasks": {name: [] for name in names},
        "configs": {
            r["task"]: {
                "task": r["task"],
                "dataset_path": r["source"] or r["format"],
                "num_fewshot": 0,
                "metadata": {"version": TASK_VERSION, "format": r["format"]},
            }
            for r in records
        },
        "versions": {name: TASK_VERSION for name in names},
        "n-shot": {name: 0 for name in names},
        "higher_is_better": {
            r["task"]: {
                bare_metric(k): HIGHER_IS_BETTER[bare_metric(k)]
                for k in r["metrics"]
                if bare_metric(k) in HIGHER_IS_BETTER
            }
            for r in records
        },
        "n-samples": {
            r["task"]: {"original": r["documents"], "effective": r["samples"]} for r in records
        },
        "config": {"model": "meshline", "model_args": model_args, "num_fewshot": 0},
    }


def scores(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``task.metric`` -> value for every finite metric (MLflow's names)."""
    flat = {}
    for record in records:
        for key, value in record["metrics"].items():
            if math.isfinite(value):
                flat[f"{record['task']}.{bare_metric(key)}"] = value
    return flat


def improvements(final: dict[str, float], initial: dict[str, float]) -> dict[str, bool]:
    """For every score both models have, whether the final model's is better."""
    better = {}
    for name, value in final.items():
        metric = name.rsplit(".", 1)[1]
        if metric in HIGHER_IS_BETTER and name in initial:
            higher = HIGHER_IS_BETTER[metric]
            better[name] = value > initial[name] if higher else value < initial[name]
    return better


def _table_rows(final: dict[str, float], initial: dict[str, float] | None) -> list[list[str]]:
    """The header and a row per score (stderrs left out)."""

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.4g}"

    header = ["task", "metric", "ours"]
    if initial is not None:
        header.append("initial")
    header += [GPTJ_6B, GPT3_CURIE]
    rows = [header]
    for name, value in final.items():
        task, metric = name.rsplit(".", 1)
        if "stderr" in metric:
            continue
        row = [task, metric, cell(value)]
        if initial is not None:
            row.append(cell(initial.get(name)))
        row += [cell(published(GPTJ_6B, task, metric)), cell(published(GPT3_CURIE, task, metric))]
        rows.append(row)
    return rows


def table(final: dict[str, float], initial: dict[str, float] | None) -> str:
    """Our scores beside the initial model's and the published GPT-J-6B and GPT-3 Curie, as
    aligned text."""
    rows = _table_rows(final, initial)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(final: dict[str, float], initial: dict[str, float] | None) -> str:
    """``table`` as a Markdown table."""
    rows = _table_rows(final, initial)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def log_bytes(ctx: StageContext, name: str, data: bytes, artifact_dir: str) -> None:
    """Log ``data`` as the MLflow artifact ``{artifact_dir}/{name}``."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            f.write(data)
        ctx.log_artifact(local, artifact_dir)


def write_results(
    ctx: StageContext,
    records: dict[str, list[dict[str, Any]]],
    measured: dict[str, dict[str, float]],
    model_args: str,
) -> None:
    """results.json (and results-initial.json) and the table of ``measured`` scores
    (table.txt, table.md), rewritten from the committed task records; MLflow artifacts too."""
    files = {
        "results.json" if model == FINAL else f"results-{model}.json": json.dumps(
            results_json(recs, model_args), indent=1
        )
        for model, recs in records.items()
    }
    files[TABLE_FILE] = table(measured[FINAL], measured.get(INITIAL))
    files["table.md"] = markdown_table(measured[FINAL], measured.get(INITIAL))
    with ctx.ledger.unit(RESULTS_UNIT) as unit:
        for name, text in files.items():
            data = text.encode() + (b"" if name.endswith(".json") else b"\n")
            with unit.open(name) as f:
                f.write(data)
            log_bytes(ctx, name, data, "results")
