"""The evaluate stage: zero-shot tasks and bits per byte on the trained checkpoint.

Inputs: ``train`` (checkpoint and model config), ``tokenize`` (the tokenizer the data was
made with) and ``dedup`` (held-out documents for bits per byte and the demo's tasks).

Ledger units (each a file under ``{out}``), so a restarted stage redoes only unfinished work:

- ``demo-tasks``: ``demo_tasks/lambada.jsonl`` and ``demo_tasks/hellaswag.jsonl`` generated
  from held-out text (``demo_tasks.py``), when the config asks for them;
- ``task/{name}``: ``tasks/{name}.json`` with one task's metrics on the final checkpoint
  (``task/bits_per_byte``: one result per held-out component and the overall ``pile``);
  with ``compare_initial`` also ``initial/task/{name}`` -> ``initial/tasks/{name}.json`` for
  the model the training run started from (rebuilt from the train stage's seed);
- ``results``: ``results.json`` (and ``results-initial.json``) in lm-eval's format, rebuilt
  on every run from the committed task files, so it always lists what has been scored;
- ``samples``: ``samples.txt``, greedy and nucleus continuations of a few prompts, also
  logged to MLflow as an artifact.

A task that fails (a missing field, an empty file) does not stop the others: they are
scored, written and logged, then the stage fails naming every failed task and its file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline import storage
from pipeline.stage import (
    StageConfig,
    StageContext,
    read_resolved_config,
    register,
    resolved_config_path,
)
from stages.evaluate.published import GPT3_CURIE, GPTJ_6B, published

if TYPE_CHECKING:
    from stages.evaluate.lm import JaxLM
    from stages.evaluate.tasks import TaskResult
    from stages.tokenize import Tokenizer
    from stages.train.hf_mapping import Params
    from stages.train.model_config import ModelConfig

log = logging.getLogger(__name__)

TaskName = Literal[
    "lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "sciq"
]
BITS_PER_BYTE = "bits_per_byte"
DEMO_UNIT = "demo-tasks"
RESULTS_UNIT = "results"
SAMPLES_UNIT = "samples"
DEMO_TASKS: dict[str, tuple[TaskName, str]] = {
    "demo_lambada": ("lambada_openai", "demo_tasks/lambada.jsonl"),
    "demo_hellaswag": ("hellaswag", "demo_tasks/hellaswag.jsonl"),
}
"""The demo's generated tasks: result name -> (task format, file in the stage output)."""
FINAL, INITIAL = "final", "initial"
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


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class TaskSpec(_Section):
    """One zero-shot task to score."""

    name: TaskName
    """The task whose format the documents have and whose scoring rules apply."""
    source: str | None = None
    """Local or gs:// JSONL/Parquet file with the task's fields; None reads the Hugging Face
    hub (a cluster without internet points this at a copy)."""
    limit: int | None = Field(default=None, gt=0)
    """Score only the first N documents (lm-eval's ``--limit``)."""
    alias: str | None = None
    """Name in results.json and MLflow (default: ``name``), so one format can be scored on
    several files."""

    @property
    def label(self) -> str:
        return self.alias or self.name


class BitsPerByteSpec(_Section):
    """Bits per byte of held-out documents, per Pile component and overall."""

    split: Literal["val", "test"] = "val"
    """The dedup stage's held-out split to read."""
    max_bytes_per_component: int = Field(default=2_000_000, gt=0)
    """UTF-8 bytes read from each component, in document order (the Pile's val split has
    about 1.4 GB; this keeps the measurement minutes, not hours)."""


class DemoTasksSpec(_Section):
    """Tasks generated offline from held-out text (see ``demo_tasks.py``)."""

    split: Literal["val", "test"] = "val"
    """The dedup stage's held-out split the passages come from."""
    lambada: int = Field(default=200, ge=1)
    """Passages in the LAMBADA-format file."""
    choice: int = Field(default=200, ge=1)
    """Questions in the HellaSwag-format file."""
    max_context_chars: int = Field(default=600, ge=50)
    """Longest passage before the predicted word or line."""
    seed: int = 0
    """Seed of which passages and distractors are chosen."""


class SamplesSpec(_Section):
    """Generated continuations logged as an artifact, as the GPT-J release showed them."""

    prompts: list[str] = ["EleutherAI is", "def fibonacci(n):", "What is 12 plus 30?\n"]
    """Prompts to continue."""
    max_new_tokens: int = Field(default=48, ge=1)
    """Tokens generated after each prompt."""
    seed: int = 0
    """Seed of the nucleus sampling."""


class EvaluateConfig(StageConfig):
    """Zero-shot evaluation of the trained checkpoint (lm-evaluation-harness semantics)."""

    tasks: list[TaskSpec] = [
        TaskSpec(name="lambada_openai"),
        TaskSpec(name="hellaswag"),
        TaskSpec(name="piqa"),
        TaskSpec(name="winogrande"),
    ]
    """Tasks to score; the default is GPT-J's published table."""
    bits_per_byte: BitsPerByteSpec | None = BitsPerByteSpec()
    """Bits per byte on held-out text per component; None skips it."""
    demo_tasks: DemoTasksSpec | None = None
    """Also generate and score the demo's offline LAMBADA and HellaSwag-format tasks."""
    step: int | None = None
    """Checkpoint step to evaluate; None takes the latest."""
    compare_initial: bool = False
    """Also score the model the training run started from, to show what training changed."""
    samples: SamplesSpec | None = SamplesSpec()
    """Continuations to generate and log; None skips them."""
    batch_size: int = Field(default=32, ge=1)
    """Rows per forward pass: a speed setting, kept out of the fingerprint."""
    max_length: int | None = Field(default=None, gt=0)
    """Context window in tokens; None uses the model's ``max_len``."""

    volatile_fields: ClassVar[frozenset[str]] = frozenset({"batch_size"})


class EvaluateError(RuntimeError):
    """One or more tasks failed; the message names each task and its file."""


# --- models ----------------------------------------------------------------------------


def checkpoint_step(train: str, step: int | None) -> int:
    """The checkpoint step to read: ``step`` if it was saved, else the latest."""
    from stages.convert import CheckpointReader

    with CheckpointReader(train, step) as reader:
        return reader.step


def final_params(train: str, step: int) -> tuple[ModelConfig, Params]:
    """The model config and the checkpoint's params, their shapes checked against each
    other before any tensor is read."""
    from stages.convert import CheckpointReader, read_model_config
    from stages.convert.layout import check_shapes

    config = read_model_config(train)
    with CheckpointReader(train, step) as reader:
        check_shapes(config, reader.shapes(), f"checkpoint {reader.where}")
        return config, reader.read_all()


def train_config(train: str) -> dict[str, Any]:
    """The train stage's resolved config, as the executor recorded it."""
    recorded = read_resolved_config(train)
    if recorded is None:
        raise FileNotFoundError(
            f"{resolved_config_path(train)}: missing; the initial model is rebuilt from the "
            "train stage's recorded config (its seed), which the executor writes there"
        )
    return recorded


def initial_params(train: str) -> tuple[ModelConfig, Params]:
    """What the training run started from: the params ``Trainer.initial_state`` makes from
    the recorded seed (or the ``init_from`` checkpoint of a fine-tuning run)."""
    import jax
    from flax import linen as nn

    from stages.convert import load_checkpoint_params, read_model_config
    from stages.train.config import TrainConfig
    from stages.train.model import init_params
    from stages.train.trainer import CHECKPOINTS

    recorded = TrainConfig.model_validate(train_config(train)["config"])
    config = read_model_config(train)
    if recorded.init_from:
        source = recorded.init_from.rstrip("/")
        source = source.removesuffix("/" + CHECKPOINTS)
        return config, load_checkpoint_params(source)
    params = nn.unbox(init_params(config, jax.random.key(recorded.seed)))
    return config, jax.device_get(params)


# --- scoring ---------------------------------------------------------------------------


def _unit(model: str, label: str) -> tuple[str, str]:
    """Ledger unit and file of one task's result for ``model`` (final or initial)."""
    prefix = "" if model == FINAL else f"{model}/"
    return f"{prefix}task/{label}", f"{prefix}tasks/{label}.json"


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


def _commit(ctx: StageContext, unit_name: str, path: str, payload: Any) -> None:
    with ctx.ledger.unit(unit_name) as unit, unit.open(path) as f:
        f.write(json.dumps(payload, indent=1, sort_keys=True).encode())


def _summary(metrics: dict[str, float]) -> str:
    shown = [f"{k.split(',')[0]} {v:.4g}" for k, v in metrics.items() if "stderr" not in k]
    return ", ".join(shown)


class _Scorer:
    """Scores every task of one model, loading the model only if some task is unfinished."""

    def __init__(self, ctx: StageContext, model: str, load: Callable[[], JaxLM]):
        self.ctx, self.model, self._load = ctx, model, load
        self._lm: JaxLM | None = None
        self.failures: list[str] = []

    @property
    def lm(self) -> JaxLM:
        if self._lm is None:
            self._lm = self._load()
        return self._lm

    def task(self, spec: TaskSpec) -> list[dict[str, Any]]:
        """The committed or newly computed result of one task ([] if it failed)."""
        from stages.evaluate.tasks import evaluate_task, load_documents

        unit_name, path = _unit(self.model, spec.label)
        if self.ctx.ledger.is_committed(unit_name):
            return [json.loads(storage.read_text(storage.join(self.ctx.output, path)))]
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
        _commit(self.ctx, unit_name, path, record)
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
        from stages.evaluate.tasks import evaluate_bits_per_byte

        unit_name, path = _unit(self.model, BITS_PER_BYTE)
        if self.ctx.ledger.is_committed(unit_name):
            return json.loads(storage.read_text(storage.join(self.ctx.output, path)))
        lm = self.lm
        started = time.perf_counter()
        named = {pile_task(component): docs for component, docs in texts.items()}
        results = evaluate_bits_per_byte(lm, named)
        documents = {"pile": sum(len(docs) for docs in named.values())}
        documents.update({name: len(docs) for name, docs in named.items()})
        records = [result_record(r, documents[r.task], None, self.ctx.output) for r in results]
        _commit(self.ctx, unit_name, path, records)
        for record in records:
            log.info(
                "evaluate: [%s] %s: %s", self.model, record["task"], _summary(record["metrics"])
            )
        log.info("evaluate: [%s] bits per byte in %.1fs", self.model, time.perf_counter() - started)
        return records


def pile_task(component: str) -> str:
    """lm-eval's task name for a Pile component: ``DM Mathematics`` -> ``pile_dm-mathematics``."""
    return "pile_" + re.sub(r"[^a-z0-9]+", "-", component.lower()).strip("-")


def score_model(
    scorer: _Scorer, specs: Sequence[TaskSpec], texts: dict[str, list[str]] | None
) -> list[dict[str, Any]]:
    """Every task's record for one model, in config order, bits per byte last."""
    records = [record for spec in specs for record in scorer.task(spec)]
    if texts:
        records.extend(scorer.bits_per_byte(texts))
    return records


# --- reporting -------------------------------------------------------------------------


def metric_name(key: str) -> str:
    """lm-eval's ``acc,none`` -> ``acc``."""
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
                metric_name(k): HIGHER_IS_BETTER[metric_name(k)]
                for k in r["metrics"]
                if metric_name(k) in HIGHER_IS_BETTER
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
                flat[f"{record['task']}.{metric_name(key)}"] = value
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


def table(final: dict[str, float], initial: dict[str, float] | None) -> str:
    """Our scores beside the initial model's and the published GPT-J-6B and GPT-3 Curie."""

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
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _log_file(ctx: StageContext, name: str, data: bytes, artifact_dir: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            f.write(data)
        ctx.log_artifact(local, artifact_dir)


def write_results(
    ctx: StageContext, records: dict[str, list[dict[str, Any]]], model_args: str
) -> None:
    """results.json (and results-initial.json), rewritten from the committed task records."""
    with ctx.ledger.unit(RESULTS_UNIT) as unit:
        for model, recs in records.items():
            name = "results.json" if model == FINAL else f"results-{model}.json"
            data = json.dumps(results_json(recs, model_args), indent=1).encode()
            with unit.open(name) as f:
                f.write(data)
            _log_file(ctx, name, data, "results")


# --- demo tasks, held-out text, samples ------------------------------------------------


def demo_task_specs(ctx: StageContext, dedup: str, spec: DemoTasksSpec) -> list[TaskSpec]:
    """Generate the demo's task files (once) and the task entries that score them."""
    from stages.evaluate import demo_tasks

    if not ctx.ledger.is_committed(DEMO_UNIT):
        documents = demo_tasks.read_split(dedup, spec.split)
        items = {
            "demo_lambada": demo_tasks.lambada_items(
                documents, spec.lambada, spec.max_context_chars, spec.seed
            ),
            "demo_hellaswag": demo_tasks.choice_items(
                documents, spec.choice, spec.max_context_chars, spec.seed
            ),
        }
        with ctx.ledger.unit(DEMO_UNIT) as unit:
            for alias, (_, path) in DEMO_TASKS.items():
                with unit.open(path) as f:
                    f.write(demo_tasks.jsonl(items[alias]))
            unit.metadata.update({alias: len(items[alias]) for alias in DEMO_TASKS})
        log.info("evaluate: demo tasks from %d held-out documents", len(documents))
    return [
        TaskSpec(name=name, source=storage.join(ctx.output, path), alias=alias)
        for alias, (name, path) in DEMO_TASKS.items()
    ]


def heldout_texts(dedup: str, spec: BitsPerByteSpec) -> dict[str, list[str]]:
    from stages.evaluate.demo_tasks import component_texts, read_split

    return component_texts(read_split(dedup, spec.split), spec.max_bytes_per_component)


def write_samples(
    ctx: StageContext, spec: SamplesSpec, config: ModelConfig, params: Params, tokenizer: Tokenizer
) -> None:
    """Greedy and nucleus continuations of the prompts: a unit and an MLflow artifact."""
    from stages.evaluate.sample import continuations, side_by_side

    if not ctx.ledger.is_committed(SAMPLES_UNIT):
        pairs = continuations(
            config, params, tokenizer, spec.prompts, spec.max_new_tokens, spec.seed
        )
        text = "\n\n".join(
            side_by_side(prompt, greedy, nucleus)
            for prompt, (greedy, nucleus) in zip(spec.prompts, pairs, strict=True)
        )
        with ctx.ledger.unit(SAMPLES_UNIT) as unit, unit.open("samples.txt") as f:
            f.write(text.encode() + b"\n")
    data = storage.read_bytes(storage.join(ctx.output, "samples.txt"))
    _log_file(ctx, "samples.txt", data, "samples")


# --- the stage -------------------------------------------------------------------------


@register("evaluate", EvaluateConfig, inputs=("train", "tokenize", "dedup"))
def run(ctx: StageContext) -> None:
    """Score every task on the final (and initial) model, write results, samples, table."""
    from stages.evaluate.lm import JaxLM
    from stages.tokenize import load_tokenizer

    config: EvaluateConfig = ctx.config
    train, tokenize, dedup = (ctx.inputs[n].uri for n in ("train", "tokenize", "dedup"))
    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenize)
    step = checkpoint_step(train, config.step)
    specs = list(config.tasks)
    if config.demo_tasks is not None:
        specs += demo_task_specs(ctx, dedup, config.demo_tasks)
    texts = None if config.bits_per_byte is None else heldout_texts(dedup, config.bits_per_byte)
    loaded: dict[str, tuple[ModelConfig, Params]] = {}

    def loader(model: str, load: Callable[[], tuple[ModelConfig, Params]]) -> Callable[[], JaxLM]:
        def make() -> JaxLM:
            loaded[model] = load()
            log.info("evaluate: [%s] model loaded", model)
            return JaxLM(*loaded[model], tokenizer, config.batch_size, config.max_length)

        return make

    models = {FINAL: loader(FINAL, lambda: final_params(train, step))}
    if config.compare_initial:
        models[INITIAL] = loader(INITIAL, lambda: initial_params(train))
    scorers = {model: _Scorer(ctx, model, load) for model, load in models.items()}
    records = {model: score_model(s, specs, texts) for model, s in scorers.items()}
    write_results(ctx, records, f"checkpoint={os.path.basename(train.rstrip('/'))},step={step}")
    measured = {model: scores(recs) for model, recs in records.items()}
    ctx.record(**measured[FINAL])
    if INITIAL in measured:
        ctx.record(**{f"{INITIAL}.{k}": v for k, v in measured[INITIAL].items()})
    if config.samples is not None:
        model_config, params = loaded.get(FINAL) or final_params(train, step)
        write_samples(ctx, config.samples, model_config, params, tokenizer)
    shown = table(measured[FINAL], measured.get(INITIAL))
    log.info("evaluate: checkpoint step %d\n%s", step, shown)
    _log_file(ctx, "table.txt", shown.encode() + b"\n", "results")
    _finish(ctx, scorers, measured, time.perf_counter() - started)


def _finish(
    ctx: StageContext,
    scorers: dict[str, _Scorer],
    measured: dict[str, dict[str, float]],
    seconds: float,
) -> None:
    """The summary line; the error naming every failed task, if any."""
    failures = [f for scorer in scorers.values() for f in scorer.failures]
    summary = f"evaluate: {len(measured[FINAL])} metrics in {seconds:.1f}s"
    if INITIAL in measured:
        better = improvements(measured[FINAL], measured[INITIAL])
        ctx.record(scores_improved=sum(better.values()), scores_compared=len(better))
        summary += f"; final beats initial on {sum(better.values())} of {len(better)} scores"
    log.info(summary)
    if failures:
        raise EvaluateError(f"{len(failures)} task(s) failed:\n" + "\n".join(failures))
