"""Baseline for the dedup benchmark: datatrove's MinHash near-dedup over a folder of JSON lines.

Runs datatrove's four MinHash steps (``MinhashDedupSignature``, ``MinhashDedupBuckets``,
``MinhashDedupCluster``, ``MinhashDedupFilter``), each with its own ``LocalPipelineExecutor``
as in datatrove's ``examples/minhash_deduplication.py``, over the ``*.jsonl`` files of a folder,
and reports the wall time of each step and the ids of the documents the filter step dropped, so
a benchmark can set meshline's dedup stage beside it on the same corpus and the same cores.

    pip install datatrove spacy   # the baseline; neither is a meshline dependency
    python benchmarks/datatrove_baseline.py INPUT_DIR WORK_DIR [--workers 2]

Written against datatrove 0.10.1. spaCy is needed because datatrove tokenizes English words
with a blank spaCy ``en`` pipeline (no model is downloaded); that tokenizer is most of the
signature step's time. datatrove's own loguru logging and progress bars are turned down to
warnings while the steps run (each task's full log stays under ``WORK_DIR/logs``).

datatrove's executor starts its worker processes with ``forkserver``, which imports the
caller's ``__main__`` module again: a script that calls ``datatrove_minhash`` must do so under
``if __name__ == "__main__":``, or every worker reruns the script.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import xxhash
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig, create_hash_func
from loguru import logger

STEPS = ("signature", "buckets", "cluster", "filter")
# Everything this module writes under ``work``; each is emptied before a run.
WORK_DIRS = ("signatures", "buckets", "remove_ids", "removed", "output", "logs")
LOG_FORMAT = "{time:HH:mm:ss} | {level: <8} | {name}:{function}:{line} - {message}"


@dataclass(frozen=True)
class DatatroveResult:
    """What one datatrove MinHash run took and removed."""

    seconds: float  # wall time of all four steps together
    step_seconds: dict[str, float]  # per step, keyed by ``STEPS``
    documents: int  # documents read
    removed: frozenset[str]  # ids of documents the filter step dropped


def _xxhash64_str(text: str) -> int:
    """datatrove's ``xxhash64`` shingle hash (the same values): datatrove 0.10.1 hands ``str``
    to ``xxhash.xxh64_intdigest``, which xxhash>=4 refuses, so encode first."""
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def _quiet_task_logger(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> IO:
    """``datatrove.utils.logging.add_task_logger`` with the console handler at WARNING (the
    task's log file under ``logs/`` still gets everything)."""
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(sys.stderr, level="WARNING", format=LOG_FORMAT)
    logger.add(logfile, level="DEBUG", format=LOG_FORMAT)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _quiet_default_logger() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format=LOG_FORMAT)


def _quiet_datatrove() -> None:
    """Point datatrove's logger setup at the quiet versions above, in this process."""
    import datatrove.executor.base
    import datatrove.utils.logging

    datatrove.executor.base.add_task_logger = _quiet_task_logger
    datatrove.utils.logging.setup_default_logger = _quiet_default_logger
    _quiet_default_logger()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Quiet datatrove in this process while the steps run, then restore its default logger."""
    import datatrove.executor.base
    import datatrove.utils.logging

    add_task_logger = datatrove.executor.base.add_task_logger
    setup_default_logger = datatrove.utils.logging.setup_default_logger
    _quiet_datatrove()
    try:
        yield
    finally:
        datatrove.executor.base.add_task_logger = add_task_logger
        datatrove.utils.logging.setup_default_logger = setup_default_logger
        setup_default_logger()


class _QuietExecutor(LocalPipelineExecutor):
    """A ``LocalPipelineExecutor`` whose tasks log to the console only at WARNING and above:
    the patch is made in whichever process runs the task (a pool worker or this one)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        _quiet_datatrove()
        return super()._run_for_rank(rank, local_rank, node_rank)


def _reader(input_dir: Path) -> JsonlReader:
    return JsonlReader(
        str(input_dir),
        compression=None,
        text_key="text",
        id_key="id",
        recursive=False,
        glob_pattern="*.jsonl",
    )


def _written_ids(folder: Path) -> Iterator[str]:
    """The ``id`` of every document a ``JsonlWriter`` wrote under ``folder``."""
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield str(json.loads(line)["id"])


def datatrove_minhash(
    input_dir: Path,
    work: Path,
    workers: int = 2,
    ngram: int = 5,
    num_buckets: int = 14,
    hashes_per_bucket: int = 8,
    seed: int = 42,
) -> DatatroveResult:
    """Near-dedup the ``*.jsonl`` files directly in ``input_dir`` with datatrove's MinHash
    pipeline and return the wall time per step and the ids of the documents it dropped.

    Each line of the input is ``{"text": ..., "id": "<unique id>", "meta": {...}}``; the reader
    takes ids from ``id`` (documents with empty text are skipped by datatrove's reader and are
    not counted). Signatures and the filter run as ``workers`` tasks on ``workers`` processes
    (datatrove gives each task whole files: ``files[rank::tasks]``); the bucket step runs
    ``num_buckets`` tasks on ``workers`` processes, one task per band as datatrove's example
    does; the cluster step is one task in this process. The filter writes the kept documents
    to ``work/output`` and the dropped ones to ``work/removed`` (datatrove's gzip JSON lines,
    as in its example), and ``removed`` is read back from the latter.

    Shingles are ``ngram`` consecutive words of datatrove's normalised text: its default
    ``TextNormConfig`` lowercases, turns numbers into ``0``, punctuation into spaces, strips
    diacritics and collapses whitespace; words come from its English tokenizer (a blank spaCy
    ``en`` pipeline, which also splits e.g. ``cannot`` into ``can not``). Each shingle is hashed
    with 64-bit xxhash (datatrove's default ``HashConfig``) and permuted by ``num_buckets *
    hashes_per_bucket`` functions ``(a * x + b) mod (2**61 - 1)`` drawn from ``seed``. Two
    documents are a pair when any bucket's ``hashes_per_bucket`` minima are all equal (no
    Jaccard check follows); pairs are joined transitively and all but one document per cluster
    is dropped. A document with fewer than ``ngram`` words has no shingle, gets no signature
    and is always kept.

    Everything is written under ``work`` (``signatures``, ``buckets``, ``remove_ids``,
    ``removed``, ``output``, ``logs``); those folders are emptied first, so a rerun starts
    from scratch rather than skipping datatrove's completed tasks.
    """
    input_dir, work = Path(input_dir).resolve(), Path(work).resolve()
    if not any(input_dir.glob("*.jsonl")):
        raise FileNotFoundError(f"no *.jsonl files in {input_dir}")
    for name in WORK_DIRS:
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    config = MinhashConfig(
        n_grams=ngram, num_buckets=num_buckets, hashes_per_bucket=hashes_per_bucket, seed=seed
    )
    signature = MinhashDedupSignature(output_folder=str(work / "signatures"), config=config)
    try:
        create_hash_func(config.hash_config)("probe")
    except TypeError:  # xxhash>=4 with datatrove's str hashing; see _xxhash64_str
        if config.hash_config != HashConfig(precision=64, hash_fc="xxhash"):
            raise
        signature._hash_func = _xxhash64_str

    def executor(pipeline: list, tasks: int, procs: int, name: str) -> LocalPipelineExecutor:
        return _QuietExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=procs,
            logging_dir=str(work / "logs" / name),
            skip_completed=False,
        )

    stages = {
        "signature": executor([_reader(input_dir), signature], workers, workers, "signature"),
        "buckets": executor(
            [
                MinhashDedupBuckets(
                    input_folder=str(work / "signatures"),
                    output_folder=str(work / "buckets"),
                    config=config,
                )
            ],
            num_buckets,
            min(workers, num_buckets),
            "buckets",
        ),
        "cluster": executor(
            [
                MinhashDedupCluster(
                    input_folder=str(work / "buckets"),
                    output_folder=str(work / "remove_ids"),
                    config=config,
                )
            ],
            1,
            1,
            "cluster",
        ),
        "filter": executor(
            [
                _reader(input_dir),
                MinhashDedupFilter(
                    input_folder=str(work / "remove_ids"),
                    exclusion_writer=JsonlWriter(str(work / "removed")),
                ),
                JsonlWriter(str(work / "output")),
            ],
            workers,
            workers,
            "filter",
        ),
    }

    step_seconds: dict[str, float] = {}
    stats: dict[str, Any] = {}
    with _quiet():
        started = time.perf_counter()
        for name in STEPS:
            step_started = time.perf_counter()
            # The cluster step runs here, and its tqdm bar would write to this console.
            hush = contextlib.redirect_stderr(io.StringIO())
            with hush if name == "cluster" else contextlib.nullcontext():
                stats[name] = stages[name].run()
            step_seconds[name] = time.perf_counter() - step_started
        seconds = time.perf_counter() - started

    # The signature step's first block is the reader, which counts "documents" per file.
    documents = int(stats["signature"].stats[0].stats["documents"].total)
    return DatatroveResult(
        seconds=seconds,
        step_seconds=step_seconds,
        documents=documents,
        removed=frozenset(_written_ids(work / "removed")),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path, help="folder of *.jsonl files (text, id, meta)")
    parser.add_argument("work_dir", type=Path, help="folder for datatrove's files")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args(argv)
    result = datatrove_minhash(args.input_dir, args.work_dir, workers=args.workers)
    print(f"seconds: {result.seconds:.2f}")
    for name, seconds in result.step_seconds.items():
        print(f"  {name}: {seconds:.2f}")
    print(f"documents: {result.documents}")
    print(f"removed: {len(result.removed)}")


if __name__ == "__main__":
    main()
