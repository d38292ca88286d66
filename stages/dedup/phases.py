"""The work of each dedup phase on one unit or partition; the stage (``stage.py``) runs
these as Ray tasks, Ray Data actors and shuffles, and commits each result as a ledger unit.

- ``exact_partition``: one hash partition of every unit's exact-hash keys -> the train
  documents removed as exact duplicates or as copies of val/test documents.
- ``Signer``: a unit's surviving train documents -> MinHash LSH band keys.
- ``explode_bands`` / ``bucket_pairs``: band keys -> (bucket, doc) rows -> after Ray Data's
  hash shuffle by bucket, candidate pairs of documents sharing a bucket.
- ``PairVerifier``: candidate pairs -> those whose exact Jaccard similarity reaches the
  threshold (the edges of the near-duplicate graph).
- ``write_output``: a unit's documents minus removals -> one output shard and its counts
  (with the clusters kept in it and the removed documents' similarity to theirs).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.ledger import Ledger
from stages.dedup.config import DedupConfig
from stages.dedup.minhash import (
    band_keys,
    pair_jaccard,
    shingle_hashes,
    shingle_sets,
    signatures,
)
from stages.dedup.units import (
    CONTAMINATED,
    EXACT_DUP,
    LINE_BITS,
    LOOKUP_ROW_GROUP,
    NEAR_DUP,
    WORK,
    read_key_range,
    read_parquet,
    read_partition,
    write_parquet,
)

REMOVAL_SCHEMA = pa.schema([("doc_key", pa.int64()), ("reason", pa.int8()), ("rep", pa.int64())])


def exact_path(partition: int) -> str:
    return f"{WORK}/exact/{partition:04d}.parquet"


def cluster_path(partition: int) -> str:
    """(removed doc_key, kept rep, similarity) of one partition of removed documents."""
    return f"{WORK}/clusters/{partition:04d}.parquet"


def sizes_path(partition: int) -> str:
    """(kept doc_key, cluster size) of one partition of kept documents."""
    return f"{WORK}/cluster_sizes/{partition:04d}.parquet"


def sig_path(unit: dict[str, Any]) -> str:
    return f"{WORK}/sig/{unit['file']}/{unit['index']:05d}.parquet"


def shingles_path(unit: dict[str, Any]) -> str:
    return f"{WORK}/shingles/{unit['file']}/{unit['index']:05d}.parquet"


def exact_partition(
    output: str, partition: int, keys_paths: list[str], config: DedupConfig
) -> dict[str, int]:
    """Find exact duplicates and contaminated train documents among the hashes of one
    partition; commit them sorted by doc_key. Returns the counts."""
    tables = [read_partition(storage.join(output, p), partition) for p in keys_paths]
    table = pa.concat_tables(tables) if tables else None
    rows = table.num_rows if table is not None else 0
    removals = np.empty((0, 3), dtype=np.int64)
    if rows:
        hi = table.column("hash_hi").to_numpy()
        lo = table.column("hash_lo").to_numpy()
        key = table.column("doc_key").to_numpy()
        held = table.column("held_out").to_numpy(zero_copy_only=False)
        # Within a group of equal hashes, held-out documents first, then by doc_key.
        order = np.lexsort((key, ~held, lo, hi))
        hi, lo, key, held = hi[order], lo[order], key[order], held[order]
        new_group = np.ones(rows, dtype=bool)
        new_group[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        group = np.cumsum(new_group) - 1
        first = np.flatnonzero(new_group)
        rep = key[first][group]
        contaminated = held[first][group] & ~held
        duplicate = ~held & ~new_group & ~contaminated
        reason = np.zeros(rows, dtype=np.int64)
        if config.decontaminate:
            reason[contaminated] = CONTAMINATED
        if config.exact:
            reason[duplicate] = EXACT_DUP
        picked = reason > 0
        removals = np.stack([key[picked], reason[picked], rep[picked]], axis=1)
        removals = removals[np.argsort(removals[:, 0], kind="stable")]
    out = pa.table(
        {
            "doc_key": pa.array(removals[:, 0], pa.int64()),
            "reason": pa.array(removals[:, 1], pa.int8()),
            "rep": pa.array(removals[:, 2], pa.int64()),
        },
        schema=REMOVAL_SCHEMA,
    )
    counts = {
        "exact_duplicates": int(np.count_nonzero(removals[:, 1] == EXACT_DUP)),
        "decontaminated": int(np.count_nonzero(removals[:, 1] == CONTAMINATED)),
    }
    with Ledger(output).unit(f"exact/{partition:04d}") as unit:
        write_parquet(unit, exact_path(partition), out, LOOKUP_ROW_GROUP)
        unit.metadata.update(counts)
    return counts


def exact_removed(output: str, partitions: int, lo: int, hi: int) -> dict[int, tuple[int, int]]:
    """doc_key -> (reason, representative) for the exact phase's removals in [lo, hi)."""
    found: dict[int, tuple[int, int]] = {}
    for p in range(partitions):
        table = read_key_range(
            storage.join(output, exact_path(p)), lo, hi, ["doc_key", "reason", "rep"]
        )
        for key, reason, rep in zip(
            table.column("doc_key").to_pylist(),
            table.column("reason").to_pylist(),
            table.column("rep").to_pylist(),
            strict=True,
        ):
            found[key] = (reason, rep)
    return found


def _key_range(output: str, paths: list[str], lo: int, hi: int, column: str) -> dict[int, float]:
    """doc_key -> ``column`` over the partition files ``paths``, for keys in [lo, hi)."""
    found: dict[int, float] = {}
    for path in paths:
        table = read_key_range(storage.join(output, path), lo, hi, ["doc_key", column])
        keys, values = table.column("doc_key").to_pylist(), table.column(column).to_pylist()
        found.update(zip(keys, values, strict=True))
    return found


def near_removed(output: str, partitions: int, lo: int, hi: int) -> dict[int, float]:
    """doc_key -> similarity to the document it was removed for (NaN where shingle sets are
    not kept), for the near-duplicates removed in [lo, hi)."""
    paths = [cluster_path(p) for p in range(partitions)]
    return _key_range(output, paths, lo, hi, "similarity")


def cluster_sizes(output: str, partitions: int, lo: int, hi: int) -> dict[int, int]:
    """doc_key -> size of its cluster (itself and the documents removed for it), for the
    kept documents in [lo, hi) that near-duplicates were removed for."""
    paths = [sizes_path(p) for p in range(partitions)]
    return {k: int(v) for k, v in _key_range(output, paths, lo, hi, "size").items()}


class Signer:
    """A Ray Data actor: for each unit it is given, computes the band keys of the unit's
    train documents that survived the exact phase and commits them as a ledger unit."""

    def __init__(self, output: str, config: DedupConfig, units: list[dict[str, Any]]):
        self.output = output
        self.config = config
        self.units = units
        self.bands, self.rows = config.band_shape()
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sign the units numbered in ``batch["unit"]``; returns how many documents each
        contributed and which worker (process id) did it."""
        signed = [self.sign(self.units[int(i)]) for i in batch["unit"]]
        return {
            "unit": batch["unit"],
            "signed": np.array(signed, dtype=np.int64),
            "worker": np.full(len(signed), self.pid, dtype=np.int64),
        }

    def sign(self, unit: dict[str, Any]) -> int:
        table = read_parquet(storage.join(self.output, unit["docs_path"]), ["doc_key", "text"])
        removed = exact_removed(self.output, self.config.partitions, unit["key_lo"], unit["key_hi"])
        keys = table.column("doc_key").to_numpy()
        texts = table.column("text").to_pylist()
        keep = [i for i, k in enumerate(keys) if int(k) not in removed]
        out_keys: list[np.ndarray] = []
        out_bands: list[np.ndarray] = []
        out_sets: list[pa.Array] = []
        for batch in _batches([texts[i] for i in keep], self.config.batch_bytes):
            lo, hi = batch
            chunk = [texts[i] for i in keep[lo:hi]]
            hashes, offsets = shingle_hashes(
                chunk, self.config.shingle, self.config.ngram, self.config.lowercase
            )
            sig = signatures(
                hashes, offsets, self.config.num_perm, self.config.seed, self.config.scheme
            )
            has_shingles = np.diff(offsets) > 0
            out_keys.append(keys[keep[lo:hi]][has_shingles])
            out_bands.append(band_keys(sig[has_shingles], self.bands, self.rows))
            if self.config.verify:
                values, set_offsets = shingle_sets(hashes, offsets)
                sets = pa.LargeListArray.from_arrays(set_offsets, pa.array(values, pa.uint64()))
                out_sets.append(sets.filter(pa.array(has_shingles)))
        all_keys = np.concatenate(out_keys) if out_keys else np.empty(0, np.int64)
        all_bands = np.concatenate(out_bands) if out_bands else np.empty((0, self.bands), np.uint64)
        columns = {"doc_key": pa.array(all_keys, pa.int64())}
        for b in range(self.bands):
            columns[f"band{b:03d}"] = pa.array(all_bands[:, b], pa.uint64())
        with Ledger(self.output).unit(f"sig/{unit['file']}/{unit['index']:05d}") as committed:
            write_parquet(committed, sig_path(unit), pa.table(columns))
            if self.config.verify:
                sets = pa.chunked_array(out_sets, pa.large_list(pa.uint64()))
                write_parquet(
                    committed,
                    shingles_path(unit),
                    pa.table({"doc_key": columns["doc_key"], "shingles": sets}),
                )
            committed.metadata.update(signed=len(all_keys))
        return len(all_keys)


def _batches(texts: list[str], limit: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive texts holding about ``limit`` characters each."""
    ranges = []
    lo = size = 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= limit:
            ranges.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(texts):
        ranges.append((lo, len(texts)))
    return ranges


def explode_bands(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One (bucket, doc_key) row per document and band."""
    bands = sorted(k for k in batch if k.startswith("band"))
    keys = np.stack([batch[b] for b in bands], axis=1) if bands else np.empty((0, 0), np.uint64)
    return {
        "bucket": keys.reshape(-1).astype(np.uint64),
        "doc_key": np.repeat(batch["doc_key"].astype(np.int64), len(bands)),
    }


def bucket_pairs(block: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
    """Candidate pairs (a < b) of every bucket in a block that holds whole buckets (Ray
    Data's hash shuffle by bucket): each member with the next ``window`` members in
    doc_key order, so every pair of a small bucket and a chain through a large one."""
    bucket = block["bucket"].astype(np.uint64)
    key = block["doc_key"].astype(np.int64)
    order = np.lexsort((key, bucket))
    bucket, key = bucket[order], key[order]
    a_parts, b_parts = [], []
    for step in range(1, window + 1):
        same = (bucket[step:] == bucket[:-step]) & (key[step:] != key[:-step])
        a_parts.append(key[:-step][same])
        b_parts.append(key[step:][same])
    return {"a": np.concatenate(a_parts), "b": np.concatenate(b_parts)}


class PairVerifier:
    """A Ray Data map: keeps the candidate pairs whose exact Jaccard similarity of shingle
    sets reaches the threshold, reading the sets of the pairs' documents from the units'
    shingle files."""

    def __init__(self, output: str, units: list[dict[str, Any]], threshold: float):
        self.output = output
        self.units = units
        self.key_lo = np.array([u["key_lo"] for u in units], dtype=np.int64)
        self.threshold = threshold

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = block["a"].astype(np.int64), block["b"].astype(np.int64)
        keep = self.similarity(a, b) >= self.threshold
        return {"a": a[keep], "b": b[keep]}

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The exact Jaccard similarity of the shingle sets of each pair (a[i], b[i])."""
        if not len(a):
            return np.empty(0, dtype=np.float64)
        keys, index = np.unique(np.concatenate([a, b]), return_inverse=True)
        values, offsets = self.sets_of(keys)
        return pair_jaccard(values, offsets, index[: len(a)], index[len(a) :])

    def sets_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shingle sets of ``keys`` (sorted, all signed) in ``pair_jaccard``'s layout."""
        tables = []
        for u in np.unique(np.searchsorted(self.key_lo, keys, side="right") - 1):
            unit = self.units[int(u)]
            table = read_parquet(storage.join(self.output, shingles_path(unit)))
            tables.append(table.filter(pa.array(np.isin(table.column("doc_key").to_numpy(), keys))))
        table = pa.concat_tables(tables)
        order = np.argsort(table.column("doc_key").to_numpy(), kind="stable")
        sets = table.column("shingles").take(pa.array(order)).combine_chunks()
        lengths = pc.list_value_length(sets).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return pc.list_flatten(sets).to_numpy(), offsets


def _component_counts(
    rows: Iterable[tuple[int, str, str, int]],
    near: dict[int, float],
    sizes: dict[int, int],
    threshold: float,
) -> dict[str, dict[str, int]]:
    """Per component, of a unit's (doc_key, component, text, removal reason) rows: the
    documents in, removed for each reason and out, and the near-duplicate clusters kept."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for key, name, text, reason in rows:
        c = counts[name]
        c["docs_in"] += 1
        if reason == EXACT_DUP:
            c["exact_duplicates"] += 1
        elif reason == NEAR_DUP:
            c["near_duplicates"] += 1
            # Measured where shingle sets are kept (verify); NaN compares False.
            c["near_below_threshold"] += int(near[key] < threshold)
        elif reason == CONTAMINATED:
            c["decontaminated"] += 1
        else:
            c["docs_out"] += 1
            c["bytes_out"] += len(text.encode("utf-8"))
        if key in sizes:
            c["near_clusters"] += 1
            c["largest_cluster"] = max(c["largest_cluster"], sizes[key])
    return {n: dict(sorted(c.items())) for n, c in sorted(counts.items())}


def write_output(
    output: str,
    unit: dict[str, Any],
    part: int,
    config: DedupConfig,
    near_done: bool,
) -> dict[str, Any]:
    """Commit a unit's surviving documents as ``{split}/part-NNNNN.parquet``; returns (and
    keeps in the ledger) the counts per pile_set_name."""
    table = read_parquet(storage.join(output, unit["docs_path"]))
    keys = table.column("doc_key").to_numpy()
    texts = table.column("text").to_pylist()
    names = table.column("pile_set_name").to_pylist()
    reasons = np.zeros(len(keys), dtype=np.int8)
    near: dict[int, float] = {}
    sizes: dict[int, int] = {}
    if unit["split"] == "train":
        exact = exact_removed(output, config.partitions, unit["key_lo"], unit["key_hi"])
        if near_done:
            near = near_removed(output, config.partitions, unit["key_lo"], unit["key_hi"])
            sizes = cluster_sizes(output, config.partitions, unit["key_lo"], unit["key_hi"])
        for i, k in enumerate(keys.tolist()):
            if k in exact:
                reasons[i] = exact[k][0]
            elif k in near:
                reasons[i] = NEAR_DUP
    keep = reasons == 0
    line = keys & ((1 << LINE_BITS) - 1)
    out = pa.table(
        {
            "text": pa.array([t for t, k in zip(texts, keep, strict=True) if k], pa.string()),
            "pile_set_name": pa.array(
                [n for n, k in zip(names, keep, strict=True) if k], pa.string()
            ),
            "doc_id": pa.array([f"{unit['file']}:{n}" for n in line[keep].tolist()], pa.string()),
        }
    )
    rows = zip(keys.tolist(), names, texts, reasons.tolist(), strict=True)
    metadata = {
        "split": unit["split"],
        "components": _component_counts(rows, near, sizes, config.threshold),
    }
    with Ledger(output).unit(f"out/{unit['split']}/{part:05d}") as committed:
        write_parquet(committed, f"{unit['split']}/part-{part:05d}.parquet", out)
        committed.metadata.update(metadata)
    return metadata
