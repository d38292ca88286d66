"""Row packing and the shard reader without Ray: a shard's bytes depend only on the ids
written (not on how they arrived), rows span record batches correctly, uint32 shards for
large vocabularies, EOS joining, and reader errors."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from stages.tokenize.packing import ROWS_PER_BATCH, RowWriter, row_schema, with_eos
from stages.tokenize.reader import ShardDataset

ROW = 9


def write_shard(path, ids: np.ndarray, pieces: list[int], carry: np.ndarray | None = None):
    """Write ``ids`` cut into pieces of the given sizes; returns the file bytes and leftover."""
    sink = io.BytesIO()
    writer = RowWriter(sink, ROW, ids.dtype, carry)
    start = 0
    for size in pieces:
        writer.add(ids[start : start + size])
        start += size
    writer.add(ids[start:])
    leftover = writer.close()
    path.write_bytes(sink.getvalue())
    return sink.getvalue(), leftover


def test_shard_bytes_do_not_depend_on_how_ids_arrive(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=ROW * (2 * ROWS_PER_BATCH + 300) + 5).astype(np.uint16)
    whole, leftover = write_shard(tmp_path / "a.arrow", ids, [])
    pieces = list(rng.integers(1, 5000, size=40))
    pieced, leftover_pieced = write_shard(tmp_path / "b.arrow", ids, pieces)
    assert whole == pieced
    assert np.array_equal(leftover, ids[-5:]) and np.array_equal(leftover_pieced, leftover)
    reader = pa.ipc.open_file(tmp_path / "a.arrow")
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == [
        ROWS_PER_BATCH,
        ROWS_PER_BATCH,
        300,
    ]


def test_reader_indexes_rows_across_record_batches_and_shards(tmp_path):
    first = np.arange(ROW * (ROWS_PER_BATCH + 10), dtype=np.uint32) + 70_000
    second = np.arange(ROW * 3, dtype=np.uint32)
    carry = np.array([1, 2, 3], dtype=np.uint32)
    write_shard(tmp_path / "0.arrow", first, [])
    _, leftover = write_shard(tmp_path / "1.arrow", second, [4], carry)
    dataset = ShardDataset([str(tmp_path / "0.arrow"), str(tmp_path / "1.arrow")])
    assert len(dataset) == ROWS_PER_BATCH + 10 + 3 and dataset.dtype == np.uint32
    assert np.array_equal(dataset[ROWS_PER_BATCH + 1], first[(ROWS_PER_BATCH + 1) * ROW :][:ROW])
    expected = np.concatenate([carry, second])
    assert np.array_equal(dataset[ROWS_PER_BATCH + 10], expected[:ROW])
    assert np.array_equal(leftover, expected[-3:])
    assert pa.ipc.open_file(tmp_path / "0.arrow").schema == row_schema(ROW, np.dtype(np.uint32))
    assert np.array_equal(dataset.take([0, -1]), np.stack([dataset[0], dataset[-1]]))


def test_with_eos_joins_documents_and_reader_rejects_other_files(tmp_path):
    documents = [np.array([5, 6], np.uint16), np.zeros(0, np.uint16), np.array([7], np.uint16)]
    assert with_eos(documents, 0, np.dtype(np.uint16)).tolist() == [5, 6, 0, 0, 7, 0]
    with pytest.raises(TypeError, match="ids are int64"):
        RowWriter(io.BytesIO(), ROW, np.dtype(np.uint16)).add(np.arange(3))
    table = pa.table({"tokens": pa.array([[1, 2]], pa.list_(pa.uint16()))})
    with pa.ipc.new_file(str(tmp_path / "x.arrow"), table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(ValueError, match="not a fixed-size list"):
        ShardDataset([str(tmp_path / "x.arrow")])
