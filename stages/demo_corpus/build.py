"""The demo corpus as a Pile mirror publishes it: ``train/NN.jsonl.zst``, ``val.jsonl.zst``,
``test.jsonl.zst`` and ``SHA256SUMS.txt``, the same bytes every time.

A few deliberate copies guarantee that every kind of duplicate the pipeline removes is
present whatever the installation holds: exact copies and one-line edits inside train, and
held-out documents leaked into train (the Pile removes train documents found in val/test).
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig

import zstandard

from pipeline import storage
from stages.demo_corpus.config import DemoCorpusConfig
from stages.demo_corpus.documents import GITHUB, Doc, Unit, content_hash
from stages.demo_corpus.github import select_github, stdlib_sources
from stages.demo_corpus.mathematics import math_documents

CHECKSUMS = "SHA256SUMS.txt"

# Fixed so that the compressed bytes (and so SHA256SUMS.txt) never change between builds.
_ZSTD_LEVEL = 3
# Injected copies are taken from documents at most this large, so that the budget can set
# aside room for them before the Github component is chosen.
_COPY_MAX_BYTES = 8_000
# A one-line edit leaves a document near its original only if it has enough other lines.
_NEAR_DUPLICATE_MIN_LINES = 10
# What a near duplicate adds to its line: a change that keeps the line's meaning.
_EDIT_MARK = "  # edited"


def file_names(config: DemoCorpusConfig) -> list[str]:
    """The data files' names, relative to the mirror: train shards, then val, then test."""
    names = [f"train/{k:02d}.jsonl.zst" for k in range(config.train_shards)]
    return names + ["val.jsonl.zst", "test.jsonl.zst"]


def corpus_files(config: DemoCorpusConfig) -> dict[str, bytes]:
    """Every file of the mirror, name -> bytes, ``SHA256SUMS.txt`` last.

    Raises ValueError when the budget cannot hold the requested math documents, the reserved
    copies and at least one Github document per split."""
    files = dict(zip(file_names(config), _compressed_splits(config), strict=True))
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
    return {**files, CHECKSUMS: sums.encode()}


def build_demo_corpus(dest: str, config: DemoCorpusConfig) -> list[str]:
    """Write the mirror's files under dest; return the data files' names relative to dest
    (SHA256SUMS.txt, written last, is not among them).

    A dest whose SHA256SUMS.txt already lists exactly these files, with matching hashes,
    is left untouched, whatever config built it: give each config its own dest."""
    names = file_names(config)
    if _already_built(dest, names):
        return names
    for name, data in corpus_files(config).items():
        storage.write_atomic(storage.join(dest, name), data)
    return names


def _already_built(dest: str, names: list[str]) -> bool:
    sums_uri = storage.join(dest, CHECKSUMS)
    if not storage.exists(sums_uri):
        return False
    listed = [line.partition("  ") for line in storage.read_text(sums_uri).splitlines()]
    if [name for _, _, name in listed] != names:
        return False
    for digest, _, name in listed:
        uri = storage.join(dest, name)
        if not storage.exists(uri) or hashlib.sha256(storage.read_bytes(uri)).hexdigest() != digest:
            return False
    return True


def _compressed_splits(config: DemoCorpusConfig) -> list[bytes]:
    """Compressed contents of the train shards, then val, then test."""
    budget = int(config.max_text_mb * 1_000_000)
    math_units = [Unit(f"math/{i}", (doc,)) for i, doc in enumerate(math_documents(config))]
    copies = config.exact_duplicates + config.near_duplicates + config.contaminated_documents
    github_budget = budget - sum(u.docs[0].size for u in math_units) - copies * _COPY_MAX_BYTES
    if github_budget <= 0:
        raise ValueError(
            f"max_text_mb={config.max_text_mb} cannot hold {config.math_documents} "
            f"math_documents and {copies} injected copies: raise max_text_mb or lower them"
        )
    sources = stdlib_sources(sysconfig.get_paths()["stdlib"], config.max_file_kb * 1024)
    github_units = select_github(sources, github_budget, config)
    train: list[Doc] = []
    val: list[Doc] = []
    test: list[Doc] = []
    for units in (github_units, math_units):
        unit_train, unit_val, unit_test = _assign_splits(units, config)
        train += unit_train
        val += unit_val
        test += unit_test
    rng = random.Random(f"{config.seed}/copies")
    train += _copies(train, val + test, config, rng)
    shuffle = random.Random(f"{config.seed}/shuffle")
    for docs in (train, val, test):
        shuffle.shuffle(docs)
    shards = [train[k :: config.train_shards] for k in range(config.train_shards)]
    return [_compress(docs) for docs in [*shards, val, test]]


def _compress(docs: list[Doc]) -> bytes:
    lines = (
        json.dumps({"text": d.text, "meta": {"pile_set_name": d.component}}, ensure_ascii=False)
        + "\n"
        for d in docs
    )
    # threads=0: one thread compresses in one deterministic frame layout.
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=0)
    return compressor.compress("".join(lines).encode("utf-8"))


# --- Splits and deliberate copies -------------------------------------------------------


def _assign_splits(
    units: list[Unit], config: DemoCorpusConfig
) -> tuple[list[Doc], list[Doc], list[Doc]]:
    """Train, val and test documents: units in a seeded order by key, the first ones held
    out, so each held-out split gets its share of every component (and at least one)."""
    ordered = sorted(units, key=lambda u: content_hash(f"{config.seed}/split/{u.key}"))
    n_val = _quota(len(ordered), config.val_fraction)
    n_test = _quota(len(ordered), config.test_fraction)
    if n_val + n_test >= len(ordered):
        raise ValueError(
            f"only {len(ordered)} units of a component: raise max_text_mb or math_documents"
        )

    def docs(part: list[Unit]) -> list[Doc]:
        return [doc for unit in part for doc in unit.docs]

    return (
        docs(ordered[n_val + n_test :]),
        docs(ordered[:n_val]),
        docs(ordered[n_val : n_val + n_test]),
    )


def _quota(n: int, fraction: float) -> int:
    return max(1, round(n * fraction)) if fraction > 0 else 0


def _copies(
    train: list[Doc], held_out: list[Doc], config: DemoCorpusConfig, rng: random.Random
) -> list[Doc]:
    """The deliberate duplicates to add to train: exact copies, one-line edits of Github
    files, and leaked held-out documents."""

    def small(docs: list[Doc]) -> list[Doc]:
        return [d for d in docs if d.size <= _COPY_MAX_BYTES - len(_EDIT_MARK)]

    def sample(docs: list[Doc], k: int) -> list[Doc]:
        return rng.sample(docs, min(k, len(docs)))

    editable = [
        d
        for d in small(train)
        if d.component == GITHUB and len(d.text.splitlines()) >= _NEAR_DUPLICATE_MIN_LINES
    ]
    exact = sample(small(train), config.exact_duplicates)
    near = [_edit_line(d, rng) for d in sample(editable, config.near_duplicates)]
    leaked = sample(small(held_out), config.contaminated_documents)
    return exact + near + leaked


def _edit_line(doc: Doc, rng: random.Random) -> Doc:
    """The document with one non-blank line changed (a trailing comment added)."""
    lines = doc.text.split("\n")
    index = rng.choice([i for i, line in enumerate(lines) if line.strip()])
    lines[index] += _EDIT_MARK
    return Doc("\n".join(lines), doc.component)
