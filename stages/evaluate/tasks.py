"""The zero-shot tasks of GPT-J's table, built as lm-evaluation-harness's task files build
them, and Pile-style bits per byte.

Each ``Task`` names the Hugging Face dataset, subset and split the harness evaluates, the
fields a document needs, and turns a document into a ``Question``: its loglikelihood
requests, gold index and choice lengths (for ``acc_norm``). The prompts follow the harness's
YAMLs and ``utils.py`` files for lambada_openai, hellaswag (with its ``preprocess``), piqa,
winogrande (partial scoring: the two sentence starts are contexts of one shared
continuation), arc_easy, arc_challenge and sciq, zero-shot.

Documents come from a local or ``gs://`` ``.jsonl`` / ``.json`` / ``.parquet`` file with the
dataset's fields, or from the hub through ``datasets``. Bad input raises ``TaskDataError``
naming the file, line (or record) and field.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow.parquet as pq

from pipeline import storage
from stages.evaluate import metrics
from stages.evaluate.lm import JaxLM

log = logging.getLogger(__name__)


class TaskDataError(ValueError):
    """A task's documents are missing, empty or malformed; the message says where."""


@dataclass(frozen=True)
class Question:
    """One document as loglikelihood requests."""

    requests: tuple[tuple[str, str], ...]
    """(context, continuation) pairs; one per choice for multiple choice."""
    gold: int = 0
    """Index of the right choice."""
    lengths: tuple[float, ...] = ()
    """Character length of each choice, the ``acc_norm`` divisor."""


@dataclass(frozen=True)
class Task:
    """A harness task: where its documents live and how one becomes a ``Question``."""

    name: str
    kind: Literal["loglikelihood", "multiple_choice"]
    dataset: str
    subset: str | None
    split: str
    fields: tuple[str, ...]
    """Fields every document needs; ``a.b`` is field b of the mapping in field a."""
    metrics: tuple[str, ...]
    question: Callable[[Mapping[str, Any]], Question]


@dataclass(frozen=True)
class TaskResult:
    """A task's metrics under the harness's keys (``"acc,none"``, ``"acc_stderr,none"``...)."""

    task: str
    metrics: dict[str, float]
    samples: int


def _choices(context: str, choices: Sequence[str], gold: int) -> Question:
    """A multiple-choice question: the choices follow the context after a space."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is outside the {len(choices)} choices")
    requests = tuple((context, f" {choice}") for choice in choices)
    return Question(requests, gold, tuple(float(len(c)) for c in choices))


def _lambada(doc: Mapping[str, Any]) -> Question:
    words = doc["text"].split(" ")
    return Question(((" ".join(words[:-1]), " " + words[-1]),))


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag's cleanup of WikiHow artefacts (lm-eval ``hellaswag/utils.py``)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(doc: Mapping[str, Any]) -> Question:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + context)
    endings = [hellaswag_preprocess(e) for e in doc["endings"]]
    return _choices(query, endings, int(doc["label"]))


def _piqa(doc: Mapping[str, Any]) -> Question:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _winogrande(doc: Mapping[str, Any]) -> Question:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    starts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    continuation = " " + sentence[blank + 1 :].strip()
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Question(
        tuple((s, continuation) for s in starts), gold, tuple(map(float, map(len, starts)))
    )


def _arc(doc: Mapping[str, Any]) -> Question:
    choices = doc["choices"]
    gold = list(choices["label"]).index(doc["answerKey"])
    return _choices(f"Question: {doc['question']}\nAnswer:", list(choices["text"]), gold)


def _sciq(doc: Mapping[str, Any]) -> Question:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices(context, choices, 3)


_MC = ("acc", "acc_norm")
_ARC_FIELDS = ("question", "choices.text", "choices.label", "answerKey")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "lambada_openai",
            "loglikelihood",
            "EleutherAI/lambada_openai",
            "default",
            "test",
            ("text",),
            ("perplexity", "acc"),
            _lambada,
        ),
        Task(
            "hellaswag",
            "multiple_choice",
            "Rowan/hellaswag",
            None,
            "validation",
            ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
            _MC,
            _hellaswag,
        ),
        Task(
            "piqa",
            "multiple_choice",
            "baber/piqa",
            None,
            "validation",
            ("goal", "sol1", "sol2", "label"),
            _MC,
            _piqa,
        ),
        Task(
            "winogrande",
            "multiple_choice",
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            ("sentence", "option1", "option2", "answer"),
            ("acc",),
            _winogrande,
        ),
        Task(
            "arc_easy",
            "multiple_choice",
            "allenai/ai2_arc",
            "ARC-Easy",
            "test",
            _ARC_FIELDS,
            _MC,
            _arc,
        ),
        Task(
            "arc_challenge",
            "multiple_choice",
            "allenai/ai2_arc",
            "ARC-Challenge",
            "test",
            _ARC_FIELDS,
            _MC,
            _arc,
        ),
        Task(
            "sciq",
            "multiple_choice",
            "allenai/sciq",
            None,
            "test",
            ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
            _MC,
            _sciq,
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def _read_records(source: str) -> list[tuple[str, Any]]:
    """(where, record) for each record of a .jsonl, .json or .parquet file."""
    try:
        data = storage.read_bytes(source)
    except OSError as exc:
        raise TaskDataError(f"{source}: cannot read ({exc})") from None
    if source.endswith(".parquet"):
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [(f"{source}: row {i}", row) for i, row in enumerate(rows, start=1)]
    text = data.decode("utf-8")
    if source.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{source}: not valid JSON ({exc})") from None
        return [(f"{source}: record {i}", r) for i, r in enumerate(records, start=1)]
    if not source.endswith((".jsonl", ".json")):
        raise TaskDataError(f"{source}: expected a .jsonl, .json or .parquet file")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((f"{source}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{source}:{number}: not valid JSON ({exc})") from None
    return records


def _check(task: Task, where: str, doc: Any) -> None:
    """Raise naming the first missing field, then build the question to vet the values."""
    if not isinstance(doc, Mapping):
        raise TaskDataError(f"{where}: a {task.name} document must be an object")
    for field in task.fields:
        value: Any = doc
        for part in field.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise TaskDataError(f"{where}: {task.name} document has no field {field!r}")
            value = value[part]
    try:
        task.question(doc)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise TaskDataError(f"{where}: bad {task.name} document ({exc!r})") from None


def load_documents(task: str, source: str | None) -> list[dict]:
    """The task's documents from ``source`` (a local or ``gs://`` file), or from the hub
    (the dataset, subset and split the harness uses) when None."""
    spec = get_task(task)
    records = _hub_records(spec) if source is None else _read_records(source)
    if not records:
        raise TaskDataError(f"{source or spec.dataset}: no {task} documents")
    for where, doc in records:
        _check(spec, where, doc)
    return [doc for _, doc in records]


def _hub_records(task: Task) -> list[tuple[str, Any]]:
    import datasets

    where = f"{task.dataset}" + (f"/{task.subset}" if task.subset else "") + f":{task.split}"
    try:
        dataset = datasets.load_dataset(task.dataset, task.subset, split=task.split)
    except Exception as exc:  # datasets raises many kinds (offline, missing, auth)
        raise TaskDataError(
            f"{where}: cannot load from the hub ({exc}); give a local file"
        ) from None
    return [(f"{where} record {i}", dict(doc)) for i, doc in enumerate(dataset, start=1)]


def evaluate_task(
    lm: JaxLM,
    task: str,
    docs: Sequence[dict],
    limit: int | None = None,
    bootstrap_iters: int = metrics.BOOTSTRAP_ITERS,
) -> TaskResult:
    """Score the first ``limit`` documents (all if None) zero-shot, as the harness would."""
    began = time.perf_counter()
    spec = get_task(task)
    questions = [spec.question(doc) for doc in docs[:limit]]
    if not questions:
        raise TaskDataError(f"{task}: no documents to evaluate")
    flat = [request for q in questions for request in q.requests]
    answers = iter(lm.loglikelihood(flat))
    per_doc = [[next(answers) for _ in q.requests] for q in questions]
    if spec.kind == "loglikelihood":
        lls = [answer[0][0] for answer in per_doc]
        greedy = [answer[0][1] for answer in per_doc]
        result = metrics.loglikelihood(lls, greedy, bootstrap_iters)
    else:
        result = metrics.multiple_choice(
            [[ll for ll, _ in answer] for answer in per_doc],
            [q.lengths for q in questions],
            [q.gold for q in questions],
            spec.metrics,
        )
    log.info(
        "%s: %d documents, %d requests in %.1f s: %s",
        task,
        len(questions),
        len(flat),
        time.perf_counter() - began,
        ", ".join(f"{k} {v:.4g}" for k, v in result.items()),
    )
    return TaskResult(task, result, len(questions))


def evaluate_bits_per_byte(lm: JaxLM, texts: Mapping[str, Sequence[str]]) -> list[TaskResult]:
    """Word/byte perplexity and bits per byte of each component's documents (task named as
    the component), then of all of them together as ``pile``."""
    began = time.perf_counter()
    names = [name for name, docs in texts.items() for _ in docs]
    flat = [doc for docs in texts.values() for doc in docs]
    if not flat:
        raise TaskDataError("bits per byte: no documents")
    lls = lm.loglikelihood_rolling(flat)
    results = []
    for component, docs in texts.items():
        if docs:
            mine = [ll for ll, name in zip(lls, names, strict=True) if name == component]
            results.append(TaskResult(component, metrics.rolling(mine, docs), len(docs)))
    results.append(TaskResult("pile", metrics.rolling(lls, flat), len(flat)))
    log.info(
        "bits per byte: %d documents in %d components in %.1f s: %.4f overall",
        len(flat),
        len(results) - 1,
        time.perf_counter() - began,
        results[-1].metrics[metrics.key("bits_per_byte")],
    )
    return results
