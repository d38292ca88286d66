"""Encoding on Ray Data: an autoscaling pool of ``Encoder`` actors (one tokenizer, one core
each) reads the dedup parts' Parquet row groups and encodes their documents, each followed
by EOS, one batch at a time; ``encoded_batches`` hands the results back in part and row
order, one ``Encoded`` per stream and batch, for the driver to pack."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import storage
from pipeline.raydata import release_stranded_data_coordinator
from stages.tokenize.config import TokenizeConfig
from stages.tokenize.packing import with_eos
from stages.tokenize.parts import INPUT_COLUMNS, Encoded, Part, TokenizeError
from stages.tokenize.tokenizer import load_tokenizer


class Encoder:
    """A Ray Data actor: one tokenizer, loaded once; reads a Parquet row group of a part and
    encodes its documents, one batch of ``batch_rows`` documents at a time."""

    def __init__(self, tokenizer_dir: str, streams: list[str], batch_rows: int, chunk_chars: int):
        # One core per actor: the pool, not the tokenizer's own threads, is the parallelism.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.streams = streams
        self.batch_rows = batch_rows
        self.chunk_chars = chunk_chars
        self.pid = os.getpid()

    def __call__(self, items: pa.Table) -> Iterator[pa.Table]:
        for source, row_group in zip(
            items.column("source").to_pylist(), items.column("row_group").to_pylist(), strict=True
        ):
            with storage.open_file(source, "rb") as f:
                batches = pq.ParquetFile(f, buffer_size=1 << 20).iter_batches(
                    batch_size=self.batch_rows, row_groups=[row_group], columns=list(INPUT_COLUMNS)
                )
                for batch in batches:
                    yield self._encode(source, batch)

    def _encode(self, source: str, batch: pa.RecordBatch) -> pa.Table:
        """One row per stream: its documents of the batch in order, each followed by EOS."""
        started = time.perf_counter()
        texts = batch.column(0).to_pylist()
        names = batch.column(1).to_pylist()
        _check_documents(source, texts, names, batch.column(2), self.streams)
        documents = self.tokenizer.encode_documents(texts, self.chunk_chars)
        members: dict[str, list[int]] = {stream: [] for stream in self.streams}
        for row, name in enumerate(names):
            members[name if self.streams != [""] else ""].append(row)
        ids, offsets, components = [], [0], []
        for stream in self.streams:
            rows = members[stream]
            stream_ids = with_eos(
                [documents[r] for r in rows], self.tokenizer.eos_id, self.tokenizer.dtype
            )
            counts: dict[str, list[int]] = {}
            for row in rows:
                entry = counts.setdefault(names[row], [0, 0])
                entry[0] += 1
                entry[1] += len(documents[row]) + 1
            ids.append(stream_ids)
            offsets.append(offsets[-1] + len(stream_ids))
            components.append(json.dumps(counts, sort_keys=True))
        values = pa.array(np.concatenate(ids))
        streams = len(self.streams)
        return pa.table(
            {
                "source": [source] * streams,
                "stream": self.streams,
                "ids": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values),
                "components": components,
                "worker": [self.pid] * streams,
                "peak_rss_kb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss] * streams,
                "encode_seconds": [time.perf_counter() - started] + [0.0] * (streams - 1),
            }
        )


def _check_documents(
    source: str, texts: list, names: list, doc_ids: pa.Array, streams: list[str]
) -> None:
    for values, column in ((texts, "text"), (names, "pile_set_name")):
        if None in values:
            doc_id = doc_ids[values.index(None)].as_py()
            raise TokenizeError(f"{source}: document {doc_id!r} has a null {column}")
    if streams != [""]:
        unknown = set(names) - set(streams)
        if unknown:
            row = next(i for i, n in enumerate(names) if n in unknown)
            raise TokenizeError(
                f"{source}: document {doc_ids[row].as_py()!r} is {names[row]!r}, "
                "which the mixture gives no epochs"
            )


@contextmanager
def _ordered_data() -> Iterator[None]:
    """Ray Data delivers outputs in input order while this block runs."""
    options = ray.data.DataContext.get_current().execution_options
    previous = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = previous


def encoded_batches(
    parts: list[Part], tokenizer_dir: str, config: TokenizeConfig
) -> Iterator[Encoded]:
    """The documents of ``parts`` encoded (each followed by EOS) by an autoscaling actor pool,
    in part and row order. The work items are the parts' row groups, listed in order, so
    the order does not depend on how a file reader would split or reorder files."""
    workers_max = config.workers_max or max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers_min = min(config.workers_min, workers_max)
    items = [
        {"source": part.source, "row_group": group}
        for part in parts
        for group in range(part.row_groups)
    ]
    if not items:
        return
    release_stranded_data_coordinator()
    # The dataset keeps the DataContext it was created under: order must be set before.
    with _ordered_data():
        encoded = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            Encoder,
            fn_constructor_kwargs={
                "tokenizer_dir": tokenizer_dir,
                "streams": config.streams,
                "batch_rows": config.batch_rows,
                "chunk_chars": config.chunk_chars,
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=workers_min, max_size=workers_max),
            num_cpus=1,
        )
        columns = ("source", "stream", "components", "worker", "peak_rss_kb", "encode_seconds")
        for table in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids = table.column("ids").combine_chunks()
            rows = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
            for row, (source, stream, components, worker, rss, seconds) in enumerate(rows):
                values = ids[row].values.to_numpy(zero_copy_only=True)
                yield Encoded(source, stream, values, json.loads(components), worker, rss, seconds)
