"""Dedup's Parquet parts as the tokenize stage's work: planning them (schema checked), the
train text a BPE is trained on, and one part's ledger unit, which packs the part's encoded
batches into rows and writes one shard and one carry per stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.ledger import Ledger
from stages.tokenize.config import component_dir
from stages.tokenize.packing import RowWriter

INPUT_COLUMNS = ("text", "pile_set_name", "doc_id")


class TokenizeError(ValueError):
    """Input the stage cannot tokenize; the message names the file, row or field."""


@dataclass(frozen=True)
class Part:
    """One dedup Parquet part and the ledger unit that turns it into one shard per stream."""

    split: str
    index: int
    source: str
    """URI of the Parquet part."""
    relpath: str
    """The part's path relative to the dedup output (``train/part-00000.parquet``)."""
    documents: int
    row_groups: int

    @property
    def unit(self) -> str:
        return f"{self.split}/shard-{self.index:05d}"

    def _directory(self, stream: str) -> str:
        return f"{self.split}/{component_dir(stream)}" if stream else self.split

    def shard(self, stream: str) -> str:
        return f"{self._directory(stream)}/shard-{self.index:05d}.arrow"

    def carry(self, stream: str) -> str:
        return f"{self._directory(stream)}/carry-{self.index:05d}.bin"


@dataclass
class Encoded:
    """The documents of one stream in one batch of one part, encoded by an actor."""

    source: str
    stream: str
    ids: np.ndarray
    components: dict[str, list[int]]
    """pile_set_name -> [documents, tokens]."""
    worker: int
    peak_rss_kb: int
    """The actor's peak resident memory so far."""
    encode_seconds: float


@dataclass
class Totals:
    """What the encoded batches of one or more parts add up to."""

    documents: int = 0
    tokens: int = 0
    components: dict[str, list[int]] = field(default_factory=dict)
    workers: set[int] = field(default_factory=set)
    peak_rss_kb: int = 0
    encode_seconds: float = 0.0

    def add(self, encoded: Encoded) -> None:
        self.peak_rss_kb = max(self.peak_rss_kb, encoded.peak_rss_kb)
        self.tokens += len(encoded.ids)
        self.workers.add(encoded.worker)
        self.encode_seconds += encoded.encode_seconds
        for name, (docs, tokens) in encoded.components.items():
            self.documents += docs
            counts = self.components.setdefault(name, [0, 0])
            counts[0] += docs
            counts[1] += tokens

    def merge(self, other: Totals) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.workers |= other.workers
        self.peak_rss_kb = max(self.peak_rss_kb, other.peak_rss_kb)
        self.encode_seconds += other.encode_seconds


def _check_schema(source: str, schema: pa.Schema) -> None:
    """Every input column is there and holds strings."""
    for column in INPUT_COLUMNS:
        index_of = schema.get_field_index(column)
        kind = schema.field(column).type if index_of >= 0 else None
        if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise TokenizeError(f"{source}: needs a string column {column!r}, has {schema}")


def plan_parts(dedup: str, splits: list[str]) -> list[Part]:
    """Every dedup part of ``splits`` in order, its schema checked."""
    parts = []
    for split in splits:
        sources = storage.glob(storage.join(dedup, split, "part-*.parquet"))
        if not sources:
            raise TokenizeError(f"{dedup}: no {split}/part-*.parquet (is it dedup's output?)")
        for index, source in enumerate(sources):
            with storage.open_file(source, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
                schema = metadata.schema.to_arrow_schema()
            _check_schema(source, schema)
            relpath = f"{split}/{source.rsplit('/', 1)[-1]}"
            part = Part(
                split,
                index,
                storage.absolute(source),
                relpath,
                metadata.num_rows,
                metadata.num_row_groups,
            )
            parts.append(part)
    return parts


def sample_texts(dedup: str, budget_bytes: int) -> Iterator[str]:
    """The first documents of every train part, in order, an equal share of bytes each."""
    sources = storage.glob(storage.join(dedup, "train", "part-*.parquet"))
    if not sources:
        raise TokenizeError(f"{dedup}: no train/part-*.parquet to train a tokenizer on")
    share = budget_bytes / len(sources)
    for source in sources:
        taken = 0
        with storage.open_file(source, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["text"]):
                for text in batch.column(0).to_pylist():
                    if taken >= share:
                        break
                    if text:
                        taken += len(text.encode("utf-8"))
                        yield text
                if taken >= share:
                    break


def read_carries(
    ledger: Ledger, output: str, previous: Part | None, streams: list[str], dtype: np.dtype
) -> dict[str, np.ndarray]:
    """The ids the part before the first pending one carried out, per stream."""
    if previous is None:
        return {stream: np.zeros(0, dtype) for stream in streams}
    if not ledger.is_committed(previous.unit):
        raise TokenizeError(f"{previous.unit} is not committed but a later part is")
    return {
        stream: np.frombuffer(
            storage.read_bytes(storage.join(output, previous.carry(stream))), dtype
        ).copy()
        for stream in streams
    }


def commit_part(
    ledger: Ledger,
    part: Part,
    carries: dict[str, np.ndarray],
    batches: Iterator[Encoded],
    row_len: int,
    dtype: np.dtype,
) -> tuple[dict[str, np.ndarray], Totals]:
    """Write ``part``'s shards: per stream, its carry and its encoded batches as full rows.
    Returns the ids left over per stream and the part's counts."""
    totals = Totals()
    with ledger.unit(part.unit) as unit:
        with ExitStack() as files:
            writers = {
                stream: RowWriter(
                    files.enter_context(unit.open(part.shard(stream))), row_len, dtype, carry
                )
                for stream, carry in carries.items()
            }
            for encoded in batches:
                writers[encoded.stream].add(encoded.ids)
                totals.add(encoded)
            leftovers = {stream: writer.close() for stream, writer in writers.items()}
        if totals.documents != part.documents:
            raise TokenizeError(
                f"{part.source}: {part.documents} rows in its metadata, {totals.documents} encoded"
            )
        streams = {}
        for stream, writer in writers.items():
            with unit.open(part.carry(stream)) as f:
                f.write(leftovers[stream].tobytes())
            streams[stream] = {
                "rows": writer.rows,
                "carried_in": len(carries[stream]),
                "carried_out": len(leftovers[stream]),
            }
        packed = sum(
            s["rows"] * row_len + s["carried_out"] - s["carried_in"] for s in streams.values()
        )
        if packed != totals.tokens:
            raise AssertionError(f"{part.unit}: ids lost or duplicated while packing")
        unit.metadata.update(
            source=part.relpath,
            documents=totals.documents,
            tokens=totals.tokens,
            components=totals.components,
            streams=streams,
        )
    return leftovers, totals
