"""Checks that a downloaded document file is what it claims to be, as its bytes stream past:
its compression (complete zstd frames or gzip members) and a first record that holds the
configured document fields (the first JSON line; for Parquet, the columns of its footer)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from stages.compression import CorruptStream, Decompressor
from stages.documents import (
    INPUT_SUFFIXES,
    JSON_LINES_SUFFIXES,
    PARQUET_SUFFIX,
    DocumentFields,
    Malformed,
)
from stages.download.config import DownloadError

# A document can be long, but a first line beyond this is not a document file.
MAX_FIRST_LINE_BYTES = 64 * 2**20
PARQUET_MAGIC = b"PAR1"
MAX_FOOTER_BYTES = 16 * 2**20
"""Parquet footers up to this size are kept while the file streams past and their schema
checked; a larger footer (rare: thousands of row groups) goes unchecked."""


class DocumentCheck:
    """Checks a file as its bytes stream past, without holding it in memory.

    The first problem is kept rather than raised, so that the download still finishes and a
    checksum mismatch (a bad transfer, worth fetching again) can take precedence over it."""

    def __init__(self, name: str, fields: DocumentFields):
        self.name = name
        self.fields = fields
        self.problem: str | None = None
        self._decompressor = Decompressor.for_file(name)
        self._first_line: bytearray | None = (
            bytearray() if name.endswith(JSON_LINES_SUFFIXES) else None
        )
        self._parquet = name.endswith(PARQUET_SUFFIX)
        self._head = bytearray()
        self._tail = bytearray()

    @staticmethod
    def applies_to(name: str) -> bool:
        return name.endswith((*INPUT_SUFFIXES, ".zst", ".gz"))

    def feed(self, data: bytes) -> None:
        if self.problem is not None:
            return
        if self._parquet:
            self._keep_ends(data)
        elif self._decompressor is None:
            self._take(data)
        else:
            try:
                for decoded in self._decompressor.feed(data):
                    self._take(decoded)
            except CorruptStream as exc:
                self.problem = str(exc)

    def _keep_ends(self, data: bytes) -> None:
        if len(self._head) < len(PARQUET_MAGIC):
            self._head += data[: len(PARQUET_MAGIC) - len(self._head)]
        self._tail += data
        if len(self._tail) > 2 * MAX_FOOTER_BYTES:
            del self._tail[:-MAX_FOOTER_BYTES]

    def _take(self, text: bytes) -> None:
        if self._first_line is None or not text:
            return
        line, newline, _ = text.partition(b"\n")
        self._first_line += line
        if newline:
            self._check_first_line()
        elif len(self._first_line) > MAX_FIRST_LINE_BYTES:
            self.problem = f"first line is over {MAX_FIRST_LINE_BYTES} bytes"

    def _check_first_line(self) -> None:
        line, self._first_line = bytes(self._first_line or b""), None
        try:
            record = json.loads(line)
        except ValueError as exc:
            self.problem = f"first line is not JSON ({exc})"
            return
        document = self.fields.document(record)
        if isinstance(document, Malformed):
            self.problem = f"first line lacks the configured document fields: {document.reason}"

    def _check_parquet(self) -> None:
        tail = bytes(self._tail)
        if bytes(self._head) != PARQUET_MAGIC or not tail.endswith(PARQUET_MAGIC):
            self.problem = "not Parquet (no PAR1 magic at its start and end)"
            return
        footer = int.from_bytes(tail[-8:-4], "little") + 8
        if footer > len(tail):
            return
        try:
            schema = pq.read_schema(pa.BufferReader(PARQUET_MAGIC + tail[-footer:]))
        except pa.ArrowException as exc:
            self.problem = f"not Parquet (its footer does not parse: {exc})"
            return
        missing = [c for c in self.fields.required_columns() if c not in schema.names]
        if missing:
            self.problem = f"no column {missing[0]!r} (columns: {', '.join(schema.names)})"

    def finish(self) -> None:
        """Raise, naming the file, unless all of it was well-formed."""
        if self.problem is None and self._decompressor is not None:
            try:
                self._decompressor.check_complete()
            except CorruptStream as exc:
                self.problem = str(exc)
        if self.problem is None and self._parquet:
            self._check_parquet()
        if self.problem is None and self._first_line is not None:
            if self._first_line:
                self._check_first_line()
            else:
                self.problem = "empty, no JSON line"
        if self.problem is not None:
            raise DownloadError(f"{self.name}: {self.problem}")
