"""Streaming readers of raw document files: JSON lines (``.jsonl``, ``.jsonl.zst``,
``.jsonl.gz``, ``.json.gz``) and Parquet (``.parquet``).

Ray Data's JSON reader loads a whole file per read task, and a Pile shard is ~27 GiB
uncompressed, so this reader streams: compressed bytes are read in chunks and fed to a
zstd or gzip decoder in small slices (a file may hold several frames or members in a row),
lines are cut from the decoded stream, and only the current line is ever held whole (a
single 50 MB document is one line). Parquet is read a row group at a time, in batches.
``iter_records`` can start at any record: records before it are only counted (lines) or
skipped by row-group sizes (Parquet), never parsed, so a resumed task skips finished work
cheaply. Parquet rows are numbered from 1, as lines are, so a document's id is
``file:line`` or ``file:row`` alike.

A zstd frame can only be decoded from its start, so one reader streams each file; the
stage cuts that stream into record-range units that every later phase processes in
parallel. Each record becomes a document or a ``Malformed`` reason (bad JSON, invalid
UTF-8, and what ``documents.DocumentFields`` finds wrong: a missing or mistyped field) so
callers can count and skip it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow.parquet as pq

from pipeline import storage
from stages.compression import CorruptStream, Decompressor
from stages.documents import PARQUET_SUFFIX, Document, DocumentFields, Malformed

PILE_FIELDS = DocumentFields()
"""The Pile's record shape: ``{"text": str, "meta": {"pile_set_name": str}}``."""

# Compressed bytes read from storage at a time.
READ_BYTES = 4 * 2**20
# Parquet rows converted to Python records at a time.
PARQUET_BATCH_ROWS = 1024


class ReadError(Exception):
    """A file cannot be read (corrupt or truncated compression, a Parquet file without a
    configured column); the message names file and offset or column."""


class MalformedLine(Exception):
    """A malformed record under ``strict``; the message names file and line (or row)."""


def _decoded_chunks(uri: str, name: str) -> Iterator[bytes]:
    """The decompressed bytes of ``uri`` (plain bytes unless it ends in ``.zst``/``.gz``)."""
    decompressor = Decompressor.for_file(name)
    with storage.open_file(uri, "rb") as f:
        try:
            while chunk := f.read(READ_BYTES):
                yield from decompressor.feed(chunk) if decompressor else (chunk,)
            if decompressor:
                decompressor.check_complete()
        except CorruptStream as exc:
            raise ReadError(f"{name}: {exc}") from None


def iter_lines(uri: str, name: str, start_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, line bytes without newline)`` for every line from
    ``start_line`` on. Earlier lines are counted, not returned. A final line without a
    newline counts; an empty file has no lines."""
    line_no = 1
    pending: list[bytes] = []
    for chunk in _decoded_chunks(uri, name):
        if line_no + chunk.count(b"\n") < start_line:
            line_no += chunk.count(b"\n")
            pending.clear()
            continue
        pos = 0
        while (end := chunk.find(b"\n", pos)) >= 0:
            if line_no >= start_line:
                pending.append(chunk[pos:end])
                yield line_no, b"".join(pending)
            pending.clear()
            line_no += 1
            pos = end + 1
        if pos < len(chunk):
            pending.append(chunk[pos:])
    if pending and line_no >= start_line:
        yield line_no, b"".join(pending)


def parse_line(line: bytes, fields: DocumentFields = PILE_FIELDS) -> Document | Malformed:
    """One JSON line as a document, or why it is malformed."""
    try:
        raw = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed(f"invalid UTF-8 at byte {exc.start}")
    try:
        record = json.loads(raw)
    except ValueError as exc:
        return Malformed(f"not JSON ({exc})")
    return fields.document(record)


def _parquet_records(
    uri: str, name: str, start: int, fields: DocumentFields
) -> Iterator[tuple[int, Document | Malformed]]:
    with storage.open_file(uri, "rb") as f:
        parquet = pq.ParquetFile(f)
        present = parquet.schema_arrow.names
        for column in fields.required_columns():
            if column not in present:
                raise ReadError(f"{name}: no column {column!r} (columns: {', '.join(present)})")
        columns = [c for c in fields.columns() if c in present]
        row = 1
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if row + rows <= start:
                row += rows
                continue
            batches = parquet.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=columns
            )
            for batch in batches:
                for record in batch.to_pylist():
                    if row >= start:
                        yield row, fields.document(record)
                    row += 1


def iter_records(
    uri: str, name: str, start: int = 1, fields: DocumentFields = PILE_FIELDS
) -> Iterator[tuple[int, Document | Malformed]]:
    """``(1-based line or row number, document or why it is malformed)`` for every record
    of file ``name`` from ``start`` on."""
    if name.endswith(PARQUET_SUFFIX):
        yield from _parquet_records(uri, name, start, fields)
        return
    for number, line in iter_lines(uri, name, start):
        yield number, parse_line(line, fields)
