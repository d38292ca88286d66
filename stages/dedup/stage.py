"""The dedup stage: runs the phases in order, each resumable through the ledger.

1. parse: one Ray task per input file streams it into line-range units (``units.py``),
   then commits ``parsed/{file}``; a rerun skips committed units and files.
2. exact: one Ray task per hash partition of the exact-text hashes (``exact/{p}``).
3. signatures: a Ray Data ``map_batches`` over the train units on an autoscaling actor
   pool (``sig/{unit}``).
4. near: Ray Data hash-shuffles (bucket, doc) rows by bucket into candidate pairs, keeps
   (with ``verify``) those whose exact Jaccard similarity reaches the threshold, and
   decides in distributed rounds which documents they remove, each for a kept one: the
   greedy independent set (``survivors.py``) or connected components (``components.py``).
   Each partition of the (removed, kept, similarity) rows and of the cluster sizes is
   committed (``clusters/{p}``). The phase reruns whole until every partition is
   committed.
5. output: one Ray task per unit writes ``{split}/part-NNNNN.parquet`` (``out/...``).
6. report: ``report.json`` from the units' counts, committed last; a stage that finds it
   committed only re-records its metrics.

Every unit's bytes depend only on the input and the non-volatile config, never on worker
counts, scheduling or where a previous run stopped. ``_work/`` holds the intermediates and
is removed after the report unless ``keep_intermediate``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.ledger import Ledger
from pipeline.raydata import release_stranded_data_coordinator
from pipeline.stage import StageContext, register
from pipeline.tasks import Placement, run_all
from stages.dedup.components import clusters_by_kept, connected_components
from stages.dedup.config import DedupConfig
from stages.dedup.phases import (
    PairVerifier,
    Signer,
    bucket_pairs,
    cluster_path,
    exact_partition,
    explode_bands,
    sig_path,
    sizes_path,
    write_output,
)
from stages.dedup.reader import MalformedLine, ReadError
from stages.dedup.report import build_report, record_report
from stages.dedup.survivors import greedy_removals
from stages.dedup.units import (
    LINE_BITS,
    WORK,
    FileParser,
    parquet_bytes,
    read_parquet,
)
from stages.documents import INPUT_SUFFIXES
from stages.download.manifest import downloaded_files

log = logging.getLogger("meshline.dedup")

REPORT_UNIT = "report"
REPORT_FILE = "report.json"


class DedupError(Exception):
    """A unit of the dedup stage failed; the message names its file (and line or offset)."""


def input_files(download_uri: str) -> list[tuple[str, str]]:
    """(name, uri) of every document file (JSON lines or Parquet) the download manifest
    lists, sorted by name."""
    return downloaded_files(download_uri, INPUT_SUFFIXES)


def _run_tasks(
    fn: Callable[..., Any],
    calls: list[tuple[Any, ...]],
    concurrency: int,
    desc: str,
    placement: Placement,
) -> list[Any]:
    """Run ``fn(*call)`` for every call as Ray tasks, at most ``concurrency`` at a time;
    results in call order. A failure raises the task's own error message."""
    return run_all(
        fn,
        calls,
        unwrap=(ReadError, MalformedLine),
        concurrency=concurrency,
        desc=f"dedup {desc}",
        placement=placement,
    )


def _parse_file(output: str, file: str, uri: str, index: int, config: DedupConfig) -> list:
    ledger = Ledger(output)
    units = FileParser(ledger, file, uri, index, config).run()
    with ledger.unit(f"parsed/{file}") as unit:
        unit.metadata.update(units=len(units))
    return units


def parse_all(ctx: StageContext, files: list[tuple[str, str]], placement: Placement) -> list[dict]:
    """Every unit's metadata, in file then line order."""
    config: DedupConfig = ctx.config
    if len(files) >= 1 << (63 - LINE_BITS):
        raise DedupError(f"{len(files)} input files: too many for doc keys")
    calls = []
    done: dict[int, list] = {}
    for index, (file, uri) in enumerate(files):
        if ctx.ledger.is_committed(f"parsed/{file}"):
            done[index] = list(FileParser(ctx.ledger, file, uri, index, config).committed())
        else:
            calls.append((ctx.output, file, uri, index, config))
    results = _run_tasks(_parse_file, calls, config.parse_concurrency, "parse", placement)
    for call, units in zip(calls, results, strict=True):
        done[call[3]] = units
    return [unit for index in sorted(done) for unit in done[index]]


def run_exact(ctx: StageContext, units: list[dict], placement: Placement) -> dict[str, int]:
    config: DedupConfig = ctx.config
    keys_paths = [u["keys_path"] for u in units]
    todo = [p for p in range(config.partitions) if not ctx.ledger.is_committed(f"exact/{p:04d}")]
    calls = [(ctx.output, p, keys_paths, config) for p in todo]
    _run_tasks(exact_partition, calls, config.parse_concurrency, "exact", placement)
    totals: Counter = Counter()
    for p in range(config.partitions):
        totals.update(ctx.ledger.record(f"exact/{p:04d}")["metadata"])
    return dict(totals)


def train_units(units: list[dict]) -> list[dict]:
    """The train units that hold documents: what the signature and near phases work on."""
    return [u for u in units if u["split"] == "train" and u["docs"]]


def sign_all(ctx: StageContext, train: list[dict], placement: Placement) -> set[int]:
    """Band keys of every train unit not yet signed, on a Ray Data actor pool of min..max
    workers; returns the process ids of the workers that signed them."""
    config: DedupConfig = ctx.config
    todo = [
        i
        for i, u in enumerate(train)
        if not ctx.ledger.is_committed(f"sig/{u['file']}/{u['index']:05d}")
    ]
    if not todo:
        return set()
    release_stranded_data_coordinator()
    ds = ray.data.from_items([{"unit": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        Signer,
        fn_constructor_args=(ctx.output, config, train),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=config.min_workers, max_size=config.max_workers
        ),
        num_cpus=1,
        **placement.data_options(),
    )
    signed = 0
    workers: set[int] = set()
    for row in ds.iter_rows():
        signed += int(row["signed"])
        workers.add(int(row["worker"]))
    log.info(
        "dedup: signed %d documents in %d units on %d workers", signed, len(todo), len(workers)
    )
    return workers


def _read_bands(batch: dict, output: str, train: list[dict]) -> dict:
    tables = [read_parquet(storage.join(output, sig_path(train[int(i)]))) for i in batch["unit"]]
    columns = {name: [] for name in tables[0].column_names}
    for table in tables:
        for name in columns:
            columns[name].append(table.column(name).to_numpy())
    return explode_bands({name: np.concatenate(parts) for name, parts in columns.items()})


def find_clusters(ctx: StageContext, train: list[dict], placement: Placement) -> dict[str, Any]:
    """Near-duplicate clusters: (removed, kept, similarity) rows and cluster sizes committed
    per partition; returns the cluster count and samples (kept in partition 0's record)."""
    config: DedupConfig = ctx.config
    names = [f"clusters/{p:04d}" for p in range(config.partitions)]
    if all(ctx.ledger.is_committed(n) for n in names):
        return ctx.ledger.record(names[0])["metadata"]
    release_stranded_data_coordinator()
    ds = ray.data.from_items([{"unit": i} for i in range(len(train))])
    ds = ds.map_batches(
        _read_bands, fn_args=(ctx.output, train), batch_format="numpy", **placement.data_options()
    )
    edges = (
        ds.repartition(config.partitions, keys=["bucket"])
        .map_batches(
            bucket_pairs,
            fn_kwargs={"window": config.pair_window},
            batch_size=None,
            batch_format="numpy",
        )
        .materialize()
    )
    candidates = edges.count()  # a pair sharing several buckets counts once per bucket
    if config.verify:
        edges = edges.map_batches(
            PairVerifier,
            fn_constructor_args=(ctx.output, train, config.threshold),
            batch_size=None,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                min_size=config.min_workers, max_size=config.max_workers
            ),
            **placement.data_options(),
        ).materialize()
    linked = edges.count()
    cluster_of = greedy_removals if config.clustering == "greedy" else connected_components
    removed = cluster_of(edges.to_arrow_refs(), config.partitions)
    clusters = clusters_by_kept(removed, config.partitions)
    summary = {
        "clusters": clusters.clusters,
        "candidate_pairs": candidates,
        "verified_pairs": linked if config.verify else None,
        "verify_rejected": candidates - linked,
        "samples": [
            {"size": s.size, "root": s.root, "members": s.members}
            for s in clusters.samples[: config.cluster_samples]
        ],
    }
    calls = [
        (ctx.output, p, removed[p], clusters.sizes[p], train, config, summary if p == 0 else {})
        for p in range(config.partitions)
        if not ctx.ledger.is_committed(names[p])
    ]
    _run_tasks(_write_clusters, calls, config.parse_concurrency, "clusters", placement)
    return summary


def _write_clusters(
    output: str,
    partition: int,
    removed: np.ndarray,
    sizes: np.ndarray,
    train: list[dict],
    config: DedupConfig,
    summary: dict,
) -> None:
    """Commit one partition: each removed document with the kept one it was removed for and
    their exact similarity (NaN without ``verify``, which keeps the shingle sets), and each
    kept document's cluster size."""
    doc, kept = removed[:, 0], removed[:, 1]
    similarity = np.full(len(doc), np.nan)
    if config.verify:
        similarity = PairVerifier(output, train, config.threshold).similarity(doc, kept)
    rows = pa.table(
        {
            "doc_key": pa.array(doc, pa.int64()),
            "rep": pa.array(kept, pa.int64()),
            "similarity": pa.array(similarity, pa.float64()),
        }
    )
    size_rows = pa.table(
        {"doc_key": pa.array(sizes[:, 0], pa.int64()), "size": pa.array(sizes[:, 1], pa.int64())}
    )
    with Ledger(output).unit(f"clusters/{partition:04d}") as unit:
        with unit.open(cluster_path(partition)) as f:
            f.write(parquet_bytes(rows, 16_384))
        with unit.open(sizes_path(partition)) as f:
            f.write(parquet_bytes(size_rows, 16_384))
        unit.metadata.update(summary, members=rows.num_rows)


def write_all(
    ctx: StageContext, units: list[dict], near_done: bool, placement: Placement
) -> list[dict]:
    """Write every unit's output shard; returns each shard's record metadata."""
    config: DedupConfig = ctx.config
    parts: Counter = Counter()
    calls = []
    names = []
    for unit in units:
        part = parts[unit["split"]]
        parts[unit["split"]] += 1
        name = f"out/{unit['split']}/{part:05d}"
        names.append(name)
        if not ctx.ledger.is_committed(name):
            calls.append((ctx.output, unit, part, config, near_done))
    _run_tasks(write_output, calls, config.parse_concurrency, "write", placement)
    return [ctx.ledger.record(n)["metadata"] for n in names]


def deduplicate(ctx: StageContext) -> None:
    """Every phase in order, each skipping what its ledger holds; commits the report last."""
    config: DedupConfig = ctx.config
    files = input_files(ctx.inputs["download"].uri)
    placement = Placement.for_output(ctx.output, config.shared_filesystem)
    units = parse_all(ctx, files, placement)
    train = train_units(units)
    run_exact(ctx, units, placement)
    clusters: dict[str, Any] = {}
    near_done = config.near and bool(train)
    if near_done:
        sign_all(ctx, train, placement)
        clusters = find_clusters(ctx, train, placement)
    shards = write_all(ctx, units, near_done, placement)
    report = build_report(units, shards, clusters, files, config)
    ctx.ledger.commit_json(REPORT_UNIT, REPORT_FILE, report, sort_keys=True)
    if not config.keep_intermediate:
        storage.delete(storage.join(ctx.output, WORK), recursive=True)


@register("dedup", DedupConfig, inputs=("download",))
def run(ctx: StageContext) -> None:
    """Parse, exact-dedup, decontaminate, near-dedup and write the download's files (unless
    the report is committed already), then record the report's counts."""
    started = time.monotonic()
    if ctx.ledger.is_committed(REPORT_UNIT):
        log.info("dedup: already complete, report committed")
    else:
        deduplicate(ctx)
    seconds = time.monotonic() - started
    report = ctx.ledger.read_json(REPORT_FILE)
    totals = report["totals"]
    log.info(
        "dedup: %d docs in, %d out (%d exact, %d near, %d decontaminated, %d malformed), "
        "%.1f MB out in %.1f s",
        totals["docs_in"],
        totals["docs_out"],
        totals["exact_duplicates"],
        totals["near_duplicates"],
        totals["decontaminated"],
        totals["malformed"],
        totals["bytes_out"] / 1e6,
        seconds,
    )
    near = report["near"]
    if near["enabled"]:
        below = (
            f"{totals['near_below_threshold']} removed below the threshold of the document "
            "kept for them"
            if near["similarity_measured"]
            else "similarity to the kept documents not measured (verify is off)"
        )
        log.info(
            "dedup: near-duplicates by %s: %d clusters, the largest %d documents; %s",
            near["clustering"],
            near["clusters"],
            totals["largest_cluster"],
            below,
        )
    record_report(ctx, report, seconds)
