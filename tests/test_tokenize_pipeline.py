"""The demo's path through the executor: download (demo corpus) -> dedup -> tokenize with a
BPE trained on the deduplicated train split; the manifest counts tokens per component and
the shards hold exactly the deduplicated documents, encoded, each followed by EOS."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import executor, storage
from pipeline.config import validate
from stages.tokenize import ShardDataset, load_tokenizer, read_manifest

SEQ_LEN = 255


def test_demo_download_dedup_tokenize(ray_cluster, tmp_path):
    config = validate(
        {
            "name": "demo-tokenize",
            "root": str(tmp_path / "root"),
            "stage_modules": [
                "stages.demo_corpus",
                "stages.download",
                "stages.dedup",
                "stages.tokenize",
            ],
            "stages": {
                "demo_corpus": {"max_text_mb": 1, "math_documents": 100},
                "download": {},
                "dedup": {"unit_docs": 200, "partitions": 4},
                "tokenize": {
                    "tokenizer": {"kind": "train", "vocab_size": 2048, "whitespace_tokens": 16},
                    "seq_len": SEQ_LEN,
                },
            },
        }
    )
    results = executor.run_pipeline(config, ["tokenize"], False, "test")
    outcome = results["tokenize"]
    assert not isinstance(outcome, BaseException), outcome
    output = outcome.upstream.uri
    dedup = results["dedup"].upstream.uri
    manifest = read_manifest(output)
    tokenizer = load_tokenizer(output)
    assert manifest["tokenizer"]["kind"] == "train" and tokenizer.vocab_size == 2048
    for split in ("train", "val", "test"):
        entry = manifest["splits"][split]
        assert set(entry["components"]) == {"Github", "DM Mathematics"}
        assert outcome.metrics[f"{split}.tokens"] == entry["tokens"]
        expected = []
        for part in storage.glob(storage.join(dedup, split, "part-*.parquet")):
            for text in pq.read_table(part, columns=["text"]).column(0).to_pylist():
                expected.extend([*tokenizer.encode(text), tokenizer.eos_id])
        rows = ShardDataset.from_output(output, split)
        packed = rows.take(range(len(rows))).reshape(-1)
        assert len(packed) + entry["tokens_dropped"] == len(expected) == entry["tokens"]
        assert np.array_equal(packed, np.array(expected[: len(packed)], dtype=packed.dtype))
    github = manifest["splits"]["train"]["components"]["Github"]
    assert outcome.metrics["train.tokens.Github"] == github["tokens"] > 0
    # A rerun reuses every stage.
    again = executor.run_pipeline(config, ["tokenize"], False, "test")
    assert again["tokenize"].reused and again["tokenize"].upstream.digest == outcome.upstream.digest
    shutil.rmtree(Path(tmp_path / "root"))
