"""The ready-made corpus configs run on small corpora the test writes in their layouts:
``configs/slimpajama.yaml`` (.jsonl.zst chunks under train/, validation/ and test/, the
component at ``meta.redpajama_set_name``) and ``configs/parquet-local.yaml`` (a directory of
Parquet files with a text column and no component) through dedup, and
``configs/gptj-6b-pile.yaml`` from a local imitation of its hub repo, with some components
missing, through training."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import executor
from pipeline.config import load_config
from pipeline.logs import LOG_FILE
from stages.download.manifest import read_manifest as read_download_manifest
from stages.tokenize import read_manifest
from stages.tokenize.config import PILE_EPOCHS
from stages.tokenize.manifest import missing_components
from tests.dedup_corpus import encoded, pile_record, random_text
from tests.hubserver import HubServer
from tests.tokenize_data import gpt2_ranks_path

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


PILE_MIRROR = "monology/pile-uncopyrighted"
PILE_COMMIT = "3be90335b66f24456a5d6659d9c8d208c0357119"
PRESENT = ("ArXiv", "DM Mathematics", "Github", "Pile-CC")
"""The components the imitation mirror holds; the other 18 of the Pile's 22 are missing."""


def pile_mirror_files() -> dict[str, bytes]:
    """Two of the mirror's train shards, its val and test, and its card."""
    rng = random.Random(3)

    def shard(count: int) -> bytes:
        records = [pile_record(random_text(rng, 120), PRESENT[i % 4]) for i in range(count)]
        return encoded(records, ".jsonl.zst")

    return {
        "train/00.jsonl.zst": shard(40),
        "train/01.jsonl.zst": shard(40),
        "val.jsonl.zst": shard(8),
        "test.jsonl.zst": shard(8),
        "README.md": b"# Pile Uncopyrighted\n",
    }


def test_the_gptj_pile_config_trains_on_the_components_its_hub_mirror_has(
    ray_cluster, tmp_path: Path
) -> None:
    train = {
        "model": "gptj-tiny",
        "model_overrides": {"vocab_size": 50304, "max_len": 64},
        "dtype": "float32",
        "mesh": {"data": -1, "fsdp": 1, "model": 1},
        "placement": {"hosts": 1, "devices_per_host": 1},
        "global_batch": 4,
        "micro_batches": 1,
        "steps": 3,
        "val_every": 3,
        "val_batches": 1,
        "checkpoint_every": 3,
        "keep_every": None,
        "optimizer": {"recipe": "gptj", "lr": 1e-3, "warmup_steps": 1, "anneal_steps": 2},
    }
    with HubServer(tmp_path / "hub").running() as hub:
        hub.push(PILE_MIRROR, pile_mirror_files(), commit=PILE_COMMIT)
        overrides = [
            f"root={tmp_path / 'out'}",
            "tracking_uri=",
            f"stages.download.hf_endpoint={hub.url}",
            "stages.dedup.max_workers=2",
            f"stages.tokenize.tokenizer.source={gpt2_ranks_path()}",
            "stages.tokenize.seq_len=32",
            "stages.tokenize.workers_max=2",
            f"stages.train={json.dumps(train)}",
        ]
        config = load_config(str(CONFIGS / "gptj-6b-pile.yaml"), overrides)
        results = executor.run_pipeline(config, ["train"], False, "test")
    for stage, outcome in results.items():
        assert not isinstance(outcome, BaseException), (stage, outcome)

    downloaded = read_download_manifest(results["download"].upstream.uri)
    assert {f["name"]: f["source"] for f in downloaded} == {
        name: f"hf://datasets/{PILE_MIRROR}@{PILE_COMMIT}/{name}"
        for name in ("train/00.jsonl.zst", "train/01.jsonl.zst", "val.jsonl.zst", "test.jsonl.zst")
    }
    tokens = results["tokenize"].upstream.uri
    manifest = read_manifest(tokens)
    assert missing_components(manifest) == sorted(set(PILE_EPOCHS) - set(PRESENT))
    present = {n: manifest["splits"]["train"]["components"][n]["tokens"] for n in PRESENT}
    effective = {n: present[n] * PILE_EPOCHS[n] for n in PRESENT}
    for name in PRESENT:
        weight = manifest["mixture"][name]["weight"]
        assert weight == pytest.approx(effective[name] / sum(effective.values()))
    log = (Path(tokens) / LOG_FILE).read_text()
    named = ", ".join(missing_components(manifest))
    assert f"train data lacks 18 of 22 components ({named})" in log
    assert results["train"].metrics["final_train_loss"] > 0
