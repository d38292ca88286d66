"""Test helpers for the dedup stage: Pile-format download directories, generated documents
with planted near-duplicates, and running the registered stage in-process."""

from __future__ import annotations

import gzip
import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from pipeline.ledger import Ledger
from pipeline.stage import REGISTRY, StageContext, Upstream
from stages.dedup import DedupConfig
from stages.dedup.minhash import shingle_hashes

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta") for b in range(400)]


def pile_record(text: str, component: str = "Pile-CC") -> dict:
    return {"text": text, "meta": {"pile_set_name": component}}


def pile_line(text: str, component: str = "Pile-CC") -> str:
    return json.dumps(pile_record(text, component)) + "\n"


def encoded(records: list[dict], suffix: str, row_group_rows: int = 7) -> bytes:
    """``records`` as a file of format ``suffix`` (Parquet in row groups of
    ``row_group_rows`` rows; few, so that small test files have several)."""
    if suffix == ".parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records), buf, row_group_size=row_group_rows)
        return buf.getvalue()
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    compress = {".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}
    return compress.get(suffix, bytes)(lines)


def make_download(root: Path, files: dict[str, bytes | str]) -> str:
    """A download stage output: the files (``.zst`` names compressed unless given as bytes)
    and manifest.json."""
    entries = []
    for name, content in sorted(files.items()):
        data = content.encode() if isinstance(content, str) else content
        if isinstance(content, str) and name.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        entries.append({"name": name, "size": len(data), "sha256": "", "source": name})
    (root / "manifest.json").write_text(json.dumps({"files": entries}))
    return str(root)


def run_dedup(download: str, out: Path | str, **config: Any) -> StageContext:
    """Run the stage on a download output into ``out`` (a local path or gs:// URI)."""
    ctx = StageContext(
        name="dedup",
        config=DedupConfig(**config),
        output=str(out),
        inputs={"download": Upstream("download", download, "fp", "digest")},
        ledger=Ledger(str(out)),
    )
    REGISTRY["dedup"].run(ctx)
    return ctx


def output_files(out: Path) -> dict[str, bytes]:
    """Every output shard and the report, by relative path."""
    found = sorted(out.glob("*/part-*.parquet")) + [out / "report.json"]
    return {str(p.relative_to(out)): p.read_bytes() for p in found}


def output_rows(out: Path, split: str = "train") -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(out.glob(f"{split}/part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def edited(rng: random.Random, text: str, rate: float) -> str:
    """``text`` with about ``rate`` of its words substituted, deleted or followed by an
    inserted word, in equal shares."""
    out = []
    for word in text.split():
        roll = rng.random()
        if roll < rate / 3:
            out.append(rng.choice(WORDS))
        elif roll < 2 * rate / 3:
            continue
        elif roll < rate:
            out += [word, rng.choice(WORDS)]
        else:
            out.append(word)
    return " ".join(out)


@dataclass(frozen=True)
class ChainedCorpus:
    """Documents built to chain near-duplicate pairs, with the chains' members (indices into
    ``docs``, in chain order)."""

    docs: list[str]
    chains: list[list[int]]


def chained_corpus(
    seed: int, families: int, chains: int, templates: int, distinct: int, words: int = 300
) -> ChainedCorpus:
    """Shuffled documents of four kinds: a base with edited copies at graded rates (0.5% to
    5% of words); chains where each link is a 3% edit of the one before (neighbours near
    0.75 Jaccard, two links apart near 0.58); template families sharing a 200-word header
    with bodies of 10 to 150 words (short bodies near each other, long ones not); unrelated
    documents."""
    rng = random.Random(seed)
    groups: list[list[str]] = []
    for _ in range(families):
        base = random_text(rng, words)
        copies = [edited(rng, base, rate) for rate in (0.005, 0.01, 0.02, 0.03, 0.05)]
        groups.append([base] + [c if c != base else c + " extra" for c in copies])
    chain_groups = []
    for _ in range(chains):
        links = [random_text(rng, words)]
        for _ in range(rng.randint(3, 7)):
            links.append(edited(rng, links[-1], 0.03))
        chain_groups.append(links)
    for _ in range(templates):
        header = random_text(rng, 200)
        groups.append([f"{header} {random_text(rng, rng.randint(10, 150))}" for _ in range(25)])
    groups.append([random_text(rng, words) for _ in range(distinct)])
    tagged = [(g, i, d) for g, docs in enumerate(groups + chain_groups) for i, d in enumerate(docs)]
    rng.shuffle(tagged)
    position = {(g, i): n for n, (g, i, _) in enumerate(tagged)}
    chain_members = [
        [position[(len(groups) + c, i)] for i in range(len(links))]
        for c, links in enumerate(chain_groups)
    ]
    return ChainedCorpus([d for _, _, d in tagged], chain_members)


def similar_pairs(docs: list[str], threshold: float) -> dict[tuple[int, int], float]:
    """Every pair (i < j) of documents whose exact Jaccard similarity of word 5-gram sets
    (lowercased, as dedup's default shingles) reaches ``threshold``: intersections counted
    through an inverted index, so no pair sharing a shingle is missed."""
    hashes, offsets = shingle_hashes(docs, "word", 5, True)
    sets = [np.unique(hashes[offsets[i] : offsets[i + 1]]) for i in range(len(docs))]
    holders: dict[int, list[int]] = {}
    for doc, shingles in enumerate(sets):
        for shingle in shingles.tolist():
            holders.setdefault(shingle, []).append(doc)
    shared: Counter[tuple[int, int]] = Counter()
    for group in holders.values():
        for k, a in enumerate(group):
            for b in group[k + 1 :]:
                shared[(a, b)] += 1
    pairs = {}
    for (a, b), inter in shared.items():
        similarity = inter / (len(sets[a]) + len(sets[b]) - inter)
        if similarity >= threshold:
            pairs[(a, b)] = similarity
    return pairs


@dataclass(frozen=True)
class RuleFigures:
    """How a dedup result keeps the near-duplicate rule, against exact-Jaccard pairs."""

    removed: int
    without_kept_neighbour: list[int]
    """Removed documents with no kept document at or above the threshold."""
    pairs: int
    both_kept: list[tuple[int, int]]
    """Pairs at or above the threshold with both documents kept."""

    def line(self, label: str) -> str:
        lonely = len(self.without_kept_neighbour)
        return (
            f"{label}: {self.removed} removed, {lonely} ({lonely / max(self.removed, 1):.1%}) "
            f"without a kept neighbour >= threshold; {len(self.both_kept)} of {self.pairs} "
            f"pairs >= threshold both kept ({len(self.both_kept) / max(self.pairs, 1):.2%})"
        )


def rule_figures(
    documents: int, kept: set[int], pairs: dict[tuple[int, int], float]
) -> RuleFigures:
    removed = set(range(documents)) - kept
    near_kept = {a for a, b in pairs if b in kept} | {b for a, b in pairs if a in kept}
    return RuleFigures(
        removed=len(removed),
        without_kept_neighbour=sorted(removed - near_kept),
        pairs=len(pairs),
        both_kept=sorted(p for p in pairs if p[0] in kept and p[1] in kept),
    )
