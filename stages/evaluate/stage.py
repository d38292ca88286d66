"""The evaluate stage: zero-shot tasks and bits per byte on the trained checkpoint.

Inputs: ``train`` (checkpoint and model config; its config gives the seed the initial model
is rebuilt from), ``tokenize`` (the tokenizer the data was made with) and ``dedup``
(held-out documents for bits per byte and the demo's tasks).

Ledger units (each a file under ``{out}``), so a restarted stage redoes only unfinished work:

- ``demo-tasks``: ``demo_tasks/lambada.jsonl`` and ``demo_tasks/hellaswag.jsonl`` generated
  from held-out text (``demo_tasks.py``), when the config asks for them;
- ``task/{name}`` and, with ``compare_initial``, ``initial/task/{name}``: one task's
  metrics on the final checkpoint and on the model the training run started from
  (``scoring.py``);
- ``results``: ``results.json`` (and ``results-initial.json``) in lm-eval's format and the
  scores beside GPT-J-6B's published ones (``table.txt``, ``table.md``), rebuilt on every
  run from the committed task files, so they always list what has been scored
  (``report.py``);
- ``samples``: ``samples.txt``, greedy and nucleus continuations of a few prompts, also
  logged to MLflow as an artifact (``generation.py``).

A task that fails (a missing field, an empty file) does not stop the others: they are
scored, written and logged, then the stage fails naming every failed task and its file.
"""

from __future__ import annotations

import logging
import os
import time

from pipeline import storage
from pipeline.stage import StageContext, register
from stages.evaluate import demo_tasks
from stages.evaluate.config import (
    FINAL,
    INITIAL,
    BitsPerByteSpec,
    DemoTasksSpec,
    EvaluateConfig,
    TaskName,
    TaskSpec,
)
from stages.evaluate.report import TABLE_FILE, improvements, scores, write_results
from stages.tokenize import load_tokenizer
from stages.train.config import TrainConfig

log = logging.getLogger(__name__)

DEMO_UNIT = "demo-tasks"
DEMO_TASKS: dict[str, tuple[TaskName, str]] = {
    "demo_lambada": ("lambada_openai", "demo_tasks/lambada.jsonl"),
    "demo_hellaswag": ("hellaswag", "demo_tasks/hellaswag.jsonl"),
}
"""The demo's generated tasks: result name -> (task format, file in the stage output)."""


class EvaluateError(RuntimeError):
    """One or more tasks failed; the message names each task and its file."""


def demo_task_specs(ctx: StageContext, dedup: str, spec: DemoTasksSpec) -> list[TaskSpec]:
    """Generate the demo's task files (once) and the task entries that score them."""
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
    """The held-out documents' texts per Pile component, up to the spec's bytes each."""
    documents = demo_tasks.read_split(dedup, spec.split)
    return demo_tasks.component_texts(documents, spec.max_bytes_per_component)


@register("evaluate", EvaluateConfig, inputs=("train", "tokenize", "dedup"))
def run(ctx: StageContext) -> None:
    """Score every task on the final (and initial) model, write results, samples, table."""
    # JAX loads when the stage runs, not when it registers.
    from stages.evaluate import generation, models, scoring
    from stages.train.compile_cache import use_compilation_cache
    from stages.train.output import checkpoint_step, load_params

    use_compilation_cache(ctx.compilation_cache)
    config: EvaluateConfig = ctx.config
    train, tokenize, dedup = (ctx.inputs[name] for name in ("train", "tokenize", "dedup"))
    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenize.uri)
    step = checkpoint_step(train.uri, config.step)
    specs = list(config.tasks)
    if config.demo_tasks is not None:
        specs += demo_task_specs(ctx, dedup.uri, config.demo_tasks)
    texts = None
    if config.bits_per_byte is not None:
        texts = heldout_texts(dedup.uri, config.bits_per_byte)
    loads = {FINAL: lambda: load_params(train.uri, step)}
    if config.compare_initial:
        loads[INITIAL] = lambda: models.initial_params(
            train.uri, TrainConfig.model_validate(train.config)
        )
    scorers = {
        model: scoring.Scorer(ctx, model, load, tokenizer, config.batch_size, config.max_length)
        for model, load in loads.items()
    }
    records = {model: scorer.score(specs, texts) for model, scorer in scorers.items()}
    measured = {model: scores(recs) for model, recs in records.items()}
    model_args = f"checkpoint={os.path.basename(train.uri.rstrip('/'))},step={step}"
    write_results(ctx, records, measured, model_args)
    ctx.record(**measured[FINAL])
    if train.run_id:
        ctx.publish_scores(train.run_id, measured[FINAL])
    if INITIAL in measured:
        ctx.record(**{f"{INITIAL}.{k}": v for k, v in measured[INITIAL].items()})
    if config.samples is not None:
        generation.write_samples(ctx, config.samples, lambda: scorers[FINAL].weights, tokenizer)
    table = storage.join(ctx.output, TABLE_FILE)
    log.info("evaluate: checkpoint step %d; table in %s", step, table)
    failures = [failure for scorer in scorers.values() for failure in scorer.failures]
    _finish(ctx, failures, measured, time.perf_counter() - started)


def _finish(
    ctx: StageContext, failures: list[str], measured: dict[str, dict[str, float]], seconds: float
) -> None:
    """The summary line; the error naming every failed task, if any."""
    summary = f"evaluate: {len(measured[FINAL])} metrics in {seconds:.1f}s"
    if INITIAL in measured:
        better = improvements(measured[FINAL], measured[INITIAL])
        ctx.record(scores_improved=sum(better.values()), scores_compared=len(better))
        summary += f"; final beats initial on {sum(better.values())} of {len(better)} scores"
    log.info(summary)
    if failures:
        raise EvaluateError(f"{len(failures)} task(s) failed:\n" + "\n".join(failures))
