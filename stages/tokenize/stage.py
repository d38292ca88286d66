"""The tokenize stage: dedup's Parquet parts -> packed Arrow IPC shards, on Ray Data.

Work, in ledger units (see the package docstring for what they write):

1. ``tokenizer``: load GPT-2's BPE or train one on a deterministic sample of dedup's train
   split, and save it. Everything after reloads it from those files.
2. One unit per dedup part. The Parquet row groups of the parts not yet committed are the
   work items of a Ray Data ``map_batches`` on an autoscaling actor pool (one tokenizer
   per actor, one core each) that reads its row group and encodes it a batch of documents
   at a time, EOS after each. With ``preserve_order`` the encoded batches reach this
   process in part and row order; it packs them into rows and streams each part's rows
   into that part's shard, carrying the ids left over into the next part. Packing here,
   in order, is what makes the bytes independent of worker count.
3. ``manifest``: row, document and token counts per split and component.

With a ``mixture`` every component is its own stream (its own shards and carries), so a
loader can sample components by weight; without one a split is a single stream.

A restart skips committed units: it resumes at the first uncommitted part of each split,
with the carries the previous part saved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field, model_validator

from pipeline import storage
from pipeline.ledger import Ledger
from pipeline.raydata import release_stranded_data_coordinator
from pipeline.stage import StageConfig, StageContext, register
from stages.tokenize.bpe import EOS, Tokenizer, load_gpt2, load_tokenizer, train_bpe
from stages.tokenize.packing import RowWriter, with_eos
from stages.tokenize.reader import MANIFEST

log = logging.getLogger("meshline.tokenize")

TOKENIZER_UNIT = "tokenizer"
TOKENIZER_DIR = "tokenizer"
MANIFEST_UNIT = "manifest"
FORMAT = "meshline.tokens.v1"
INPUT_COLUMNS = ("text", "pile_set_name", "doc_id")
# Component epochs of the Pile (REFERENCE.md section 5), for ``mixture: pile``.
PILE_EPOCHS = {
    "Pile-CC": 1.0,
    "PubMed Central": 2.0,
    "Books3": 1.5,
    "OpenWebText2": 2.0,
    "ArXiv": 2.0,
    "Github": 1.0,
    "FreeLaw": 1.5,
    "StackExchange": 2.0,
    "USPTO Backgrounds": 2.0,
    "PubMed Abstracts": 2.0,
    "Gutenberg (PG-19)": 2.5,
    "OpenSubtitles": 1.5,
    "Wikipedia (en)": 3.0,
    "DM Mathematics": 2.0,
    "Ubuntu IRC": 2.0,
    "BookCorpus2": 1.5,
    "EuroParl": 2.0,
    "HackerNews": 2.0,
    "YoutubeSubtitles": 2.0,
    "PhilPapers": 2.0,
    "NIH ExPorter": 2.0,
    "Enron Emails": 2.0,
}


class Gpt2TokenizerConfig(StageConfig):
    """GPT-2's byte-level BPE (50257 ids, EOS ``<|endoftext|>`` = 50256)."""

    kind: Literal["gpt2"] = "gpt2"
    """GPT-2's tokenizer, encoded with tiktoken."""
    source: str = "gpt2"
    """A tiktoken ranks file (path, ``gs://`` or ``http(s)://`` URL, e.g. openai-whisper's
    ``whisper/assets/gpt2.tiktoken``), a Hugging Face ``tokenizer.json`` or a directory holding
    one, or ``gpt2`` for tiktoken's registry (needs its download site or cache)."""
    sha256: str | None = None
    """Expected sha256 of the file ``source`` names."""


class TrainedTokenizerConfig(StageConfig):
    """A byte-level BPE trained on dedup's train split, as GPT-NeoX trained its own."""

    kind: Literal["train"] = "train"
    """Train a byte-level BPE with Hugging Face ``tokenizers`` (GPT-2's split pattern)."""
    vocab_size: int = Field(default=50257, ge=260)
    """Every id: 256 bytes, special tokens, whitespace tokens and learned merges."""
    special_tokens: list[str] = Field(default=[EOS], min_length=1)
    """Special tokens (ids from 0); the first is EOS, appended after every document."""
    whitespace_tokens: int = Field(default=0, ge=0)
    """Add runs of 2, 3, ... spaces as this many extra tokens (GPT-NeoX's code-friendly
    whitespace tokens)."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair is merged only if it occurs at least this often in the sample."""
    sample_mb: float = Field(default=100.0, gt=0)
    """Text the BPE is trained on, in 10^6 UTF-8 bytes: the first documents of every train
    part in order, an equal share per part."""


class TokenizeConfig(StageConfig):
    """Which tokenizer, how rows are packed, and how many encoding workers."""

    tokenizer: Gpt2TokenizerConfig | TrainedTokenizerConfig = Field(
        default_factory=Gpt2TokenizerConfig, discriminator="kind"
    )
    """``{kind: gpt2, source: ...}`` or ``{kind: train, vocab_size: ...}``."""
    seq_len: int = Field(default=2048, ge=1)
    """Tokens of context; rows hold ``seq_len + 1`` ids (inputs ``[:-1]``, targets ``[1:]``)."""
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    """Dedup splits to tokenize; each becomes ``{output}/{split}/``."""
    mixture: Literal["pile"] | dict[str, float] | None = None
    """Pack every component (pile_set_name) into its own shards and record its epochs, so
    the loader can weight components: ``pile`` (the Pile's table) or name -> epochs. A
    document of a component not listed fails the stage. None: one stream per split."""
    workers_min: int = Field(default=1, ge=1)
    """Encoding actors the pool starts with."""
    workers_max: int | None = Field(default=None, ge=1)
    """Encoding actors the pool may grow to (one CPU each); default: the cluster's CPUs."""
    batch_rows: int = Field(default=512, ge=1)
    """Documents encoded per actor call (a Parquet row group is read in batches of this)."""
    chunk_chars: int = Field(default=1 << 20, ge=1024)
    """Documents longer than this are encoded in chunks of about this many characters, cut
    at safe points (same ids, bounded memory)."""

    volatile_fields = frozenset({"workers_min", "workers_max", "batch_rows", "chunk_chars"})

    @model_validator(mode="after")
    def _components_have_distinct_directories(self) -> TokenizeConfig:
        epochs = self.epochs or {}
        directories = {component_dir(name) for name in epochs}
        if len(directories) != len(epochs) or "" in directories:
            raise ValueError("mixture component names must map to distinct directory names")
        if any(e <= 0 for e in epochs.values()):
            raise ValueError("mixture epochs must be positive")
        return self

    @property
    def epochs(self) -> dict[str, float] | None:
        return PILE_EPOCHS if self.mixture == "pile" else self.mixture

    @property
    def streams(self) -> list[str]:
        """The token streams of a split: its components with a mixture, else one ("")."""
        return sorted(self.epochs) if self.epochs else [""]


def component_dir(name: str) -> str:
    """A component's directory under its split: ``Gutenberg (PG-19)`` -> ``gutenberg-pg-19``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


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
class _Encoded:
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
class _Totals:
    """What the encoded batches of one or more parts add up to."""

    documents: int = 0
    tokens: int = 0
    components: dict[str, list[int]] = field(default_factory=dict)
    workers: set[int] = field(default_factory=set)
    peak_rss_kb: int = 0
    encode_seconds: float = 0.0

    def add(self, encoded: _Encoded) -> None:
        self.peak_rss_kb = max(self.peak_rss_kb, encoded.peak_rss_kb)
        self.tokens += len(encoded.ids)
        self.workers.add(encoded.worker)
        self.encode_seconds += encoded.encode_seconds
        for name, (docs, tokens) in encoded.components.items():
            self.documents += docs
            counts = self.components.setdefault(name, [0, 0])
            counts[0] += docs
            counts[1] += tokens

    def merge(self, other: _Totals) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.workers |= other.workers
        self.peak_rss_kb = max(self.peak_rss_kb, other.peak_rss_kb)
        self.encode_seconds += other.encode_seconds


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
            for column in INPUT_COLUMNS:
                index_of = schema.get_field_index(column)
                kind = schema.field(column).type if index_of >= 0 else None
                if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                    raise TokenizeError(f"{source}: needs a string column {column!r}, has {schema}")
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
) -> Iterator[_Encoded]:
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
                yield _Encoded(source, stream, values, json.loads(components), worker, rss, seconds)


def _read_carries(
    ctx: StageContext, previous: Part | None, streams: list[str], dtype: np.dtype
) -> dict[str, np.ndarray]:
    """The ids the part before the first pending one carried out, per stream."""
    if previous is None:
        return {stream: np.zeros(0, dtype) for stream in streams}
    if not ctx.ledger.is_committed(previous.unit):
        raise TokenizeError(f"{previous.unit} is not committed but a later part is")
    return {
        stream: np.frombuffer(
            storage.read_bytes(storage.join(ctx.output, previous.carry(stream))), dtype
        ).copy()
        for stream in streams
    }


def _commit_part(
    ledger: Ledger,
    part: Part,
    carries: dict[str, np.ndarray],
    batches: Iterator[_Encoded],
    row_len: int,
    dtype: np.dtype,
) -> tuple[dict[str, np.ndarray], _Totals]:
    """Write ``part``'s shards: per stream, its carry and its encoded batches as full rows.
    Returns the ids left over per stream and the part's counts."""
    totals = _Totals()
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


def tokenize_parts(
    ctx: StageContext, parts: list[Part], tokenizer: Tokenizer, config: TokenizeConfig
) -> dict[str, float]:
    """Encode and pack every uncommitted part; returns facts about this run's work."""
    started = time.monotonic()
    row_len = config.seq_len + 1
    pending = [p for p in parts if not ctx.ledger.is_committed(p.unit)]
    carries: dict[str, dict[str, np.ndarray]] = {}
    for part in pending:
        if part.split not in carries:
            previous = next(
                (p for p in parts if p.split == part.split and p.index == part.index - 1), None
            )
            carries[part.split] = _read_carries(ctx, previous, config.streams, tokenizer.dtype)
    by_source = {p.source: p for p in pending}
    waiting = list(pending)
    run_totals = _Totals()
    first_batch_at: list[float] = []

    def commit(part: Part, batches: Iterator[_Encoded]) -> None:
        carries[part.split], totals = _commit_part(
            ctx.ledger, part, carries[part.split], batches, row_len, tokenizer.dtype
        )
        run_totals.merge(totals)
        log.info(
            "tokenize: %s: %d documents, %d tokens", part.unit, totals.documents, totals.tokens
        )

    batches = encoded_batches(pending, storage.join(ctx.output, TOKENIZER_DIR), config)
    for source, group in groupby(batches, key=lambda r: r.source):
        first_batch_at = first_batch_at or [time.monotonic()]
        part = by_source.get(source)
        if part is None or part not in waiting:
            raise TokenizeError(f"{source}: rows arrived out of order (or from an unplanned file)")
        # Parts that produced no rows (empty files) come before it: they pass the carry on.
        while waiting[0] is not part:
            commit(waiting.pop(0), iter(()))
        commit(waiting.pop(0), group)
    for part in waiting:
        commit(part, iter(()))
    return {
        "documents_encoded": run_totals.documents,
        "tokens_encoded": run_totals.tokens,
        "workers": len(run_totals.workers),
        "worker_peak_rss_mb": run_totals.peak_rss_kb / 1024,
        "encode_seconds": run_totals.encode_seconds,
        "startup_seconds": (first_batch_at[0] if first_batch_at else time.monotonic()) - started,
    }


def _sample_texts(dedup: str, budget_bytes: int) -> Iterator[str]:
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


def build_tokenizer(ctx: StageContext, config: TokenizeConfig) -> Tokenizer:
    """Commit the tokenizer unit (once) and return the tokenizer as reloaded from it."""
    directory = storage.join(ctx.output, TOKENIZER_DIR)
    if not ctx.ledger.is_committed(TOKENIZER_UNIT):
        spec = config.tokenizer
        started = time.monotonic()
        if isinstance(spec, Gpt2TokenizerConfig):
            tokenizer = load_gpt2(spec.source, spec.sha256, config.seq_len)
        else:
            log.info(
                "tokenize: training a %d-id BPE on %.0f MB of train text",
                spec.vocab_size,
                spec.sample_mb,
            )
            tokenizer = train_bpe(
                _sample_texts(ctx.inputs["dedup"].uri, int(spec.sample_mb * 1e6)),
                spec.vocab_size,
                spec.special_tokens,
                spec.whitespace_tokens,
                spec.min_frequency,
                config.seq_len,
            )
        with ctx.ledger.unit(TOKENIZER_UNIT) as unit:
            for name, data in sorted(tokenizer.files.items()):
                with unit.open(f"{TOKENIZER_DIR}/{name}") as f:
                    f.write(data)
            unit.metadata.update(fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size)
        log.info(
            "tokenize: %s tokenizer, %d ids, fingerprint %s (%.1f s)",
            spec.kind,
            tokenizer.vocab_size,
            tokenizer.fingerprint[:12],
            time.monotonic() - started,
        )
    return load_tokenizer(directory)


def _stream_entry(parts: list[Part], records: list[dict], stream: str) -> dict:
    shards, rows = [], 0
    for part, record in zip(parts, records, strict=True):
        count = record["streams"][stream]["rows"]
        shards.append(
            {"path": part.shard(stream), "rows": count, "first_row": rows, "source": part.relpath}
        )
        rows += count
    dropped = records[-1]["streams"][stream]["carried_out"]
    return {"rows": rows, "tokens_dropped": dropped, "shards": shards}


def _split_entry(parts: list[Part], records: list[dict], config: TokenizeConfig) -> dict:
    """A split's manifest entry: totals, components, and the shards of each stream."""
    components: dict[str, dict] = {}
    for record in records:
        for name, (docs, tokens) in sorted(record["components"].items()):
            counts = components.setdefault(name, {"documents": 0, "tokens": 0})
            counts["documents"] += docs
            counts["tokens"] += tokens
    streams = {stream: _stream_entry(parts, records, stream) for stream in config.streams}
    entry = {
        "rows": sum(s["rows"] for s in streams.values()),
        "documents": sum(r["documents"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "tokens_dropped": sum(s["tokens_dropped"] for s in streams.values()),
        "components": dict(sorted(components.items())),
    }
    if config.epochs:
        for name, stream in streams.items():
            components.setdefault(name, {"documents": 0, "tokens": 0})
            entry["components"][name] = {
                **components[name],
                "directory": component_dir(name),
                **stream,
            }
        entry["components"] = dict(sorted(entry["components"].items()))
    else:
        entry["shards"] = streams[""]["shards"]
    if entry["rows"] * (config.seq_len + 1) + entry["tokens_dropped"] != entry["tokens"]:
        raise AssertionError("packed rows and dropped ids do not add up to the ids encoded")
    return entry


def _mixture(train: dict | None, epochs: dict[str, float] | None) -> dict | None:
    """Per component: its epochs and its share of an epoch-weighted pass over train."""
    if epochs is None:
        return None
    components = train["components"] if train else {}
    effective = {n: components.get(n, {"tokens": 0})["tokens"] * e for n, e in epochs.items()}
    total = sum(effective.values()) or 1.0
    return {n: {"epochs": epochs[n], "weight": effective[n] / total} for n in sorted(epochs)}


def write_manifest(ctx: StageContext, parts: list[Part], tokenizer: Tokenizer) -> dict:
    """Commit ``manifest.json`` from the part units' records; returns it."""
    config: TokenizeConfig = ctx.config
    splits = {}
    for split in config.splits:
        members = [p for p in parts if p.split == split]
        records = [ctx.ledger.record(p.unit)["metadata"] for p in members]
        splits[split] = _split_entry(members, records, config)
    manifest = {
        "format": FORMAT,
        "seq_len": config.seq_len,
        "row_len": config.seq_len + 1,
        "dtype": tokenizer.dtype.name,
        "eos_id": tokenizer.eos_id,
        "packing": "documents in order, each followed by EOS (no BOS), concatenated per stream "
        "(a split, or a component of it with a mixture) and cut into rows of row_len; a shard's "
        "leftover ids start the next shard's first row; the stream's final leftover is dropped",
        "tokenizer": {
            "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "path": TOKENIZER_DIR,
        },
        "splits": splits,
        "mixture": _mixture(splits.get("train"), config.epochs),
    }
    with ctx.ledger.unit(MANIFEST_UNIT) as unit, unit.open(MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return manifest


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


@register("tokenize", TokenizeConfig, inputs=("dedup",))
def run(ctx: StageContext) -> None:
    """Tokenizer, then every uncommitted part, then the manifest."""
    config: TokenizeConfig = ctx.config
    started = time.monotonic()
    if ctx.ledger.is_committed(MANIFEST_UNIT):
        log.info("tokenize: already complete")
        return
    tokenizer = build_tokenizer(ctx, config)
    parts = plan_parts(ctx.inputs["dedup"].uri, list(config.splits))
    facts = tokenize_parts(ctx, parts, tokenizer, config)
    manifest = write_manifest(ctx, parts, tokenizer)
    seconds = time.monotonic() - started
    metrics = {**facts, "seconds": seconds, "tokens_per_second": facts["tokens_encoded"] / seconds}
    for name, split in manifest["splits"].items():
        metrics[f"{name}.rows"] = split["rows"]
        metrics[f"{name}.tokens"] = split["tokens"]
        for component, counts in split["components"].items():
            metrics[_metric_name(f"{name}.tokens.{component}")] = counts["tokens"]
    ctx.record(**metrics)
    log.info(
        "tokenize: %s; %d documents, %d tokens encoded in %.1f s (%.0f tokens/s, %d workers)",
        ", ".join(f"{n} {s['rows']} rows" for n, s in manifest["splits"].items()),
        facts["documents_encoded"],
        facts["tokens_encoded"],
        seconds,
        metrics["tokens_per_second"],
        facts["workers"],
    )
