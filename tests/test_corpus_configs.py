"""The ready-made corpus configs run download and dedup on small corpora the test writes in
their layouts: ``configs/slimpajama.yaml`` (.jsonl.zst chunks under train/, validation/ and
test/, the component at ``meta.redpajama_set_name``) and ``configs/parquet-local.yaml`` (a
directory of Parquet files with a text column and no component)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import executor
from pipeline.config import load_config
from tests.dedup_corpus import encoded, random_text

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
Layout = Callable[[Path], tuple[dict[str, int], int]]
"""Writes a corpus; returns the documents each split keeps, and how many train documents
are removed as exact copies of another train or a held-out document."""


def _write(root: Path, name: str, data: bytes) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)


def slimpajama_layout(root: Path) -> tuple[dict[str, int], int]:
    """SlimPajama's chunks: a train document repeated, and a validation document leaked
    into train."""
    rng = random.Random(1)
    texts = [random_text(rng, 80) for _ in range(40)]
    sets = ("RedPajamaC4", "RedPajamaGithub")

    def records(chunk: list[str]) -> list[dict]:
        return [{"text": t, "meta": {"redpajama_set_name": sets[len(t) % 2]}} for t in chunk]

    train = texts[:30] + [texts[2], texts[31]]
    for chunk, part in enumerate((train[:16], train[16:])):
        name = f"train/chunk{chunk + 1}/example_train_{chunk}.jsonl.zst"
        _write(root, name, encoded(records(part), ".jsonl.zst"))
    holdout = "chunk1/example_holdout_0.jsonl.zst"
    _write(root, f"validation/{holdout}", encoded(records(texts[30:35]), ".jsonl.zst"))
    _write(root, f"test/{holdout}", encoded(records(texts[35:40]), ".jsonl.zst"))
    return {"train": 30, "val": 5, "test": 5}, 2


def parquet_layout(root: Path) -> tuple[dict[str, int], int]:
    """Parquet files with a text column (several row groups), one in a subdirectory, and a
    val file; one train document repeated."""
    rng = random.Random(2)
    texts = [random_text(rng, 80) for _ in range(36)]
    rows = [{"text": t, "url": f"https://example.com/{i}"} for i, t in enumerate(texts)]
    _write(root, "part-00000.parquet", encoded(rows[:14], ".parquet"))
    _write(root, "more/part-00001.parquet", encoded(rows[14:30] + rows[:1], ".parquet"))
    _write(root, "val-00000.parquet", encoded(rows[30:], ".parquet"))
    return {"train": 30, "val": 6}, 1


CASES: dict[str, tuple[Layout, set[str]]] = {
    "slimpajama.yaml": (slimpajama_layout, {"RedPajamaC4", "RedPajamaGithub"}),
    "parquet-local.yaml": (parquet_layout, {"web"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_ready_made_config_reads_its_corpus_layout(ray_cluster, tmp_path: Path, name: str):
    layout, components = CASES[name]
    kept, removed = layout(tmp_path / "corpus")
    overrides = [f"root={tmp_path / 'out'}", f"stages.download.base_url={tmp_path / 'corpus'}/"]
    config = load_config(str(CONFIGS / name), overrides)
    results = executor.run_pipeline(config, ["dedup"], False, "test")
    for stage, outcome in results.items():
        assert not isinstance(outcome, BaseException), (stage, outcome)
    out = Path(results["dedup"].upstream.uri)
    report = json.loads((out / "report.json").read_text())
    assert set(report["components"]) == components
    assert report["totals"]["malformed"] == 0, report["malformed"]
    totals = report["totals"]
    assert totals["exact_duplicates"] + totals["decontaminated"] == removed
    found = {
        split: sum(pq.read_metadata(p).num_rows for p in out.glob(f"{split}/part-*.parquet"))
        for split in kept
    }
    assert found == kept
