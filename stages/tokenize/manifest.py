"""The tokenize output's ``manifest.json``: built from the part units' records and committed
as the stage's last unit, and read back by the reader and later stages."""

from __future__ import annotations

from pipeline.ledger import Ledger
from stages.tokenize.config import TokenizeConfig, component_dir
from stages.tokenize.parts import Part
from stages.tokenize.tokenizer import Tokenizer

MANIFEST = "manifest.json"
MANIFEST_UNIT = "manifest"
FORMAT = "meshline.tokens.v1"
TOKENIZER_DIR = "tokenizer"
PACKING = (
    "documents in order, each followed by EOS (no BOS), concatenated per stream "
    "(a split, or a component of it with a mixture) and cut into rows of row_len; a shard's "
    "leftover ids start the next shard's first row; the stream's final leftover is dropped"
)


def read_manifest(output: str) -> dict:
    """The ``manifest.json`` of a tokenize output directory."""
    return Ledger(output).read_json(MANIFEST)


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
    """Per component: its epochs, its share of an epoch-weighted pass over train, and
    whether train has none of it (``missing``: its share goes to the others, in proportion
    to theirs, as the weights of the components present renormalise to 1)."""
    if epochs is None:
        return None
    components = train["components"] if train else {}
    tokens = {n: components.get(n, {"tokens": 0})["tokens"] for n in epochs}
    effective = {n: tokens[n] * e for n, e in epochs.items()}
    total = sum(effective.values()) or 1.0
    return {
        n: {"epochs": epochs[n], "weight": effective[n] / total, "missing": tokens[n] == 0}
        for n in sorted(epochs)
    }


def missing_components(manifest: dict) -> list[str]:
    """The mixture's components that train has no tokens of, in name order."""
    return [n for n, entry in (manifest.get("mixture") or {}).items() if entry["missing"]]


def write_manifest(
    ledger: Ledger, config: TokenizeConfig, parts: list[Part], tokenizer: Tokenizer
) -> dict:
    """Commit ``manifest.json`` from the part units' records; returns it."""
    splits = {}
    for split in config.splits:
        members = [p for p in parts if p.split == split]
        records = [ledger.record(p.unit)["metadata"] for p in members]
        splits[split] = _split_entry(members, records, config)
    manifest = {
        "format": FORMAT,
        "seq_len": config.seq_len,
        "row_len": config.seq_len + 1,
        "dtype": tokenizer.dtype.name,
        "eos_id": tokenizer.eos_id,
        "packing": PACKING,
        "tokenizer": {
            "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "path": TOKENIZER_DIR,
        },
        "splits": splits,
        "mixture": _mixture(splits.get("train"), config.epochs),
    }
    ledger.commit_json(MANIFEST_UNIT, MANIFEST, manifest)
    return manifest
