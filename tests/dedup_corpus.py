"""Test helpers for the dedup stage: Pile-format download directories, generated documents
with planted near-duplicates, and running the registered stage in-process."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from pipeline.ledger import Ledger
from pipeline.stage import REGISTRY, StageContext, Upstream
from stages.dedup import DedupConfig

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
