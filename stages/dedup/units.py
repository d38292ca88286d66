"""Work units of the dedup stage: parsing a file into record-range units (lines, or
Parquet rows), and the Parquet files those units and later phases read and write.

A document's key is ``file_index << 40 | line`` (files in sorted name order; a Parquet
row's number stands for the line), so integer order is doc_id order and "the smallest
doc_id survives" is a comparison of keys.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.ledger import Ledger
from stages.dedup.components import partition_of
from stages.dedup.config import DedupConfig
from stages.dedup.minhash import exact_hash
from stages.dedup.reader import MalformedLine, iter_records
from stages.documents import Document, Malformed, record_word

LINE_BITS = 40
WORK = "_work"
# Malformed line numbers (with reasons) kept per unit for the report; all are counted.
MALFORMED_LISTED = 100
# Rows per Parquet row group in sorted lookup files: small enough that a reader asking for
# one unit's key range skips most of a file by its statistics.
LOOKUP_ROW_GROUP = 16_384

EXACT_DUP, NEAR_DUP, CONTAMINATED = 1, 2, 3


def split_of(name: str) -> str:
    """The output split of an input file, from its top directory or its file name (the
    Pile's ``val.jsonl.zst``, SlimPajama's ``validation/chunk1/...``): ``val*`` -> val,
    ``test*`` -> test, else train."""
    parts = name.split("/")
    for part in dict.fromkeys((parts[0], parts[-1])):
        if part.startswith("val"):
            return "val"
        if part.startswith("test"):
            return "test"
    return "train"


def doc_key(file_index: int, line: int) -> int:
    return (file_index << LINE_BITS) | line


def parse_unit_name(file: str, index: int) -> str:
    return f"parse/{file}/{index:05d}"


@dataclass
class _Pending:
    """The unit being filled while the stream is read."""

    first_line: int
    keys: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    text_bytes: int = 0
    malformed: int = 0
    malformed_listed: list[list[Any]] = field(default_factory=list)


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """A table as zstd Parquet bytes (the same bytes for the same table)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


def write_parquet(unit: Any, relpath: str, table: pa.Table, row_group_size: int | None = None):
    with unit.open(relpath) as f:
        f.write(parquet_bytes(table, row_group_size))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_file(uri, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_key_range(uri: str, lo: int, hi: int, columns: list[str]) -> pa.Table:
    """Rows of a file sorted by ``doc_key`` with lo <= doc_key < hi; row groups outside the
    range (by their statistics) are not read."""
    with storage.open_file(uri, "rb") as f:
        parquet = pq.ParquetFile(f)
        key_col = parquet.schema_arrow.get_field_index("doc_key")
        groups = []
        for g in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(g).column(key_col).statistics
            if stats is None or not stats.has_min_max or (stats.max >= lo and stats.min < hi):
                groups.append(g)
        if not groups:
            return parquet.schema_arrow.empty_table().select(columns)
        table = parquet.read_row_groups(groups, columns=columns)
    keys = table.column("doc_key").to_numpy()
    return table.filter(pa.array((keys >= lo) & (keys < hi)))


class FileParser:
    """Streams one input file into units of at most ``unit_docs`` lines / ``unit_mb`` of
    text, committing each (parsed documents + exact-hash keys) as a ledger unit, and
    skipping the units a previous run committed."""

    def __init__(self, ledger: Ledger, file: str, uri: str, file_index: int, config: DedupConfig):
        self.ledger = ledger
        self.file = file
        self.uri = uri
        self.file_index = file_index
        self.config = config
        self.split = split_of(file)

    def committed(self) -> Iterator[dict[str, Any]]:
        index = 0
        while self.ledger.is_committed(parse_unit_name(self.file, index)):
            yield self.ledger.record(parse_unit_name(self.file, index))["metadata"]
            index += 1

    def run(self) -> list[dict[str, Any]]:
        """Every unit's metadata, in line order."""
        units = list(self.committed())
        start = units[-1]["end_line"] if units else 1
        pending = _Pending(start)
        records = iter_records(self.uri, self.file, start, self.config.documents)
        for line_no, parsed in records:
            self._take(pending, line_no, parsed)
            if (
                line_no + 1 - pending.first_line >= self.config.unit_docs
                or pending.text_bytes >= self.config.unit_bytes
            ):
                units.append(self._commit(len(units), pending, line_no + 1))
                pending = _Pending(line_no + 1)
        if pending.keys or pending.malformed:
            units.append(
                self._commit(
                    len(units), pending, pending.first_line + len(pending.keys) + pending.malformed
                )
            )
        return units

    def _take(self, pending: _Pending, line_no: int, parsed: Document | Malformed) -> None:
        if not isinstance(parsed, Document):
            if self.config.strict:
                raise MalformedLine(
                    f"{self.file}:{line_no}: malformed {record_word(self.file)}: {parsed.reason}"
                )
            pending.malformed += 1
            if len(pending.malformed_listed) < MALFORMED_LISTED:
                pending.malformed_listed.append([line_no, parsed.reason])
            return
        pending.keys.append(doc_key(self.file_index, line_no))
        pending.texts.append(parsed.text)
        pending.names.append(parsed.pile_set_name)
        pending.hashes.append(exact_hash(parsed.text, self.config.normalize))
        pending.text_bytes += len(parsed.text.encode("utf-8"))

    def _commit(self, index: int, pending: _Pending, end_line: int) -> dict[str, Any]:
        name = parse_unit_name(self.file, index)
        keys = np.array(pending.keys, dtype=np.int64)
        docs = pa.table(
            {
                "doc_key": pa.array(keys, pa.int64()),
                "text": pa.array(pending.texts, pa.string()),
                "pile_set_name": pa.array(pending.names, pa.string()),
            }
        )
        hashes = np.frombuffer(b"".join(pending.hashes), dtype=np.uint64).reshape(-1, 2)
        metadata = {
            "file": self.file,
            "index": index,
            "split": self.split,
            "first_line": pending.first_line,
            "end_line": end_line,
            "docs": len(keys),
            "text_bytes": pending.text_bytes,
            "malformed": pending.malformed,
            "malformed_lines": pending.malformed_listed,
            "key_lo": doc_key(self.file_index, pending.first_line),
            "key_hi": doc_key(self.file_index, end_line),
            "docs_path": f"{WORK}/parse/{self.file}/{index:05d}.parquet",
            "keys_path": f"{WORK}/keys/{self.file}/{index:05d}.parquet",
        }
        with self.ledger.unit(name) as unit:
            write_parquet(unit, metadata["docs_path"], docs)
            with unit.open(metadata["keys_path"]) as f:
                f.write(_keys_file(keys, hashes, self.split != "train", self.config.partitions))
            unit.metadata.update(metadata)
        return metadata


def _keys_file(keys: np.ndarray, hashes: np.ndarray, held_out: bool, partitions: int) -> bytes:
    """(part, hash_hi, hash_lo, doc_key, held_out) sorted by part, one row group per
    partition, so the exact phase's partition p reads only its own rows."""
    hi = hashes[:, 0].copy() if len(hashes) else np.empty(0, np.uint64)
    lo = hashes[:, 1].copy() if len(hashes) else np.empty(0, np.uint64)
    part = partition_of(hi.view(np.int64), partitions)
    order = np.lexsort((keys, part))
    table = pa.table(
        {
            "part": pa.array(part[order], pa.int32()),
            "hash_hi": pa.array(hi[order], pa.uint64()),
            "hash_lo": pa.array(lo[order], pa.uint64()),
            "doc_key": pa.array(keys[order], pa.int64()),
            "held_out": pa.array(np.full(len(keys), held_out), pa.bool_()),
        }
    )
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as writer:
        bounds = np.searchsorted(part[order], np.arange(partitions + 1))
        for p in range(partitions):
            if bounds[p + 1] > bounds[p]:
                writer.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))
        if not len(keys):
            writer.write_table(table)
    return buf.getvalue()


def read_partition(uri: str, partition: int) -> pa.Table:
    """The rows of partition ``partition`` of a keys file."""
    with storage.open_file(uri, "rb") as f:
        parquet = pq.ParquetFile(f)
        groups = []
        for g in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(g).column(0).statistics
            if stats is not None and stats.has_min_max and stats.min == partition:
                groups.append(g)
        if not groups:
            return parquet.schema_arrow.empty_table()
        return parquet.read_row_groups(groups)
