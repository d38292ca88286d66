"""A hand-made tokenize output (the tokenize stage's contract) for the train tests: Arrow
shards written by the stage's own ``RowWriter`` and a manifest with the fields train reads.

The documents are arithmetic progressions mod the vocabulary (random start and stride), so
a tiny model can learn them within a few dozen steps and the validation loss visibly falls.
"""

from __future__ import annotations

import json
import os

import numpy as np

from stages.tokenize.packing import RowWriter, with_eos


def progressions(rng: np.random.Generator, count: int, vocab: int, eos: int) -> list[np.ndarray]:
    """``count`` documents ``a, a+d, a+2d, ...`` (mod ``eos``) of 8 to 40 ids."""
    docs = []
    for _ in range(count):
        start, stride, length = rng.integers(eos), rng.integers(1, 5), rng.integers(8, 41)
        docs.append(((start + stride * np.arange(length)) % eos).astype(np.uint16))
    return docs


def write_tokenized(
    out: str, seq_len: int, rows: dict[str, int], vocab: int = 256, shards: int = 2, seed: int = 0
) -> str:
    """A tokenize output dir at ``out`` with about ``rows[split]`` rows per split."""
    rng = np.random.default_rng(seed)
    eos = vocab - 1
    row_len = seq_len + 1
    splits = {}
    for split, wanted in rows.items():
        os.makedirs(os.path.join(out, split), exist_ok=True)
        listed, total, carry = [], 0, None
        for shard in range(shards):
            docs = progressions(rng, wanted * row_len // 24 // shards + 4, vocab, eos)
            path = f"{split}/shard-{shard:05d}.arrow"
            with open(os.path.join(out, path), "wb") as f:
                writer = RowWriter(f, row_len, np.dtype(np.uint16), carry)
                writer.add(with_eos(docs, eos, np.dtype(np.uint16)))
                carry = writer.close()
            listed.append({"path": path, "rows": writer.rows, "first_row": total, "source": path})
            total += writer.rows
        splits[split] = {"rows": total, "shards": listed, "components": {}}
    manifest = {
        "format": "meshline.tokens.v1",
        "seq_len": seq_len,
        "row_len": row_len,
        "dtype": "uint16",
        "eos_id": eos,
        "tokenizer": {"kind": "test", "fingerprint": "test", "vocab_size": vocab},
        "splits": splits,
        "mixture": None,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out
