"""Packing a token stream into rows of ``seq_len + 1`` ids, written as an Arrow IPC file.

GPT-J's convention: every document is followed by EOS, documents are concatenated, and the
stream is cut into rows of ``seq_len + 1`` (inputs ``row[:-1]``, targets ``row[1:]``); rows
do not overlap. A ``RowWriter`` streams the full rows of one stream into one file and hands
back the remainder (fewer than ``row_len`` ids) when it closes.

Record batches always hold ``ROWS_PER_BATCH`` rows (the last one fewer), so a file's bytes
depend only on the ids written to it, never on how they arrived in pieces.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

ROWS_PER_BATCH = 1024
COLUMN = "tokens"


class BinarySink(Protocol):
    def write(self, data: bytes) -> int: ...

    def flush(self) -> None: ...


def row_schema(row_len: int, dtype: np.dtype) -> pa.Schema:
    """The shard schema: one column ``tokens: FixedSizeList<uint16|uint32>[row_len]``."""
    return pa.schema(
        [pa.field(COLUMN, pa.list_(pa.from_numpy_dtype(dtype), row_len), nullable=False)]
    )


class _ArrowSink:
    """Lets pyarrow stream into any writable (the ledger's hashing writer has no ``tell``)."""

    closed = False

    def __init__(self, raw: BinarySink):
        self._raw = raw
        self._position = 0

    def write(self, data: bytes) -> int:
        self._position += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self._position

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class RowWriter:
    """Streams the rows of one token stream into an Arrow IPC file on ``sink``."""

    def __init__(
        self, sink: BinarySink, row_len: int, dtype: np.dtype, carry: np.ndarray | None = None
    ):
        self.row_len = row_len
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._schema = row_schema(row_len, self.dtype)
        self._writer = pa.ipc.new_file(pa.PythonFile(_ArrowSink(sink), mode="w"), self._schema)
        self._pending: list[np.ndarray] = []
        self._pending_ids = 0
        if carry is not None:
            self.add(carry)

    def add(self, ids: np.ndarray) -> None:
        """Append ``ids`` to the stream; full record batches are written as they fill."""
        if ids.dtype != self.dtype:
            raise TypeError(f"ids are {ids.dtype}, the shard holds {self.dtype}")
        self._pending.append(ids)
        self._pending_ids += len(ids)
        if self._pending_ids >= ROWS_PER_BATCH * self.row_len:
            self._flush(whole_batches_only=True)

    def _flush(self, whole_batches_only: bool) -> None:
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        unit = ROWS_PER_BATCH * self.row_len if whole_batches_only else self.row_len
        cut = len(stream) // unit * unit
        for start in range(0, cut, ROWS_PER_BATCH * self.row_len):
            self._write_rows(stream[start : min(cut, start + ROWS_PER_BATCH * self.row_len)])
        rest = stream[cut:]
        self._pending = [rest]
        self._pending_ids = len(rest)

    def _write_rows(self, flat: np.ndarray) -> None:
        rows = pa.FixedSizeListArray.from_arrays(pa.array(flat), self.row_len)
        self._writer.write_batch(pa.record_batch([rows], schema=self._schema))
        self.rows += len(flat) // self.row_len

    def close(self) -> np.ndarray:
        """Write the last full rows and the file footer; return the remainder."""
        if self._pending:
            self._flush(whole_batches_only=False)
        self._writer.close()
        return self._pending[0] if self._pending else np.zeros(0, self.dtype)


def with_eos(documents: list[np.ndarray], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """The documents concatenated, each followed by ``eos_id`` (GPT-J: no BOS)."""
    total = sum(len(d) for d in documents) + len(documents)
    out = np.empty(total, dtype)
    position = 0
    for document in documents:
        out[position : position + len(document)] = document
        position += len(document)
        out[position] = eos_id
        position += 1
    return out
