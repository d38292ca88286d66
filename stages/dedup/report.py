"""The dedup stage's ``report.json``: counts per split and component from the output units'
records, malformed records per file, the LSH shape and pair counts, the largest clusters;
and the metrics the stage records from it."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from pipeline.stage import StageContext
from stages.dedup.config import DedupConfig
from stages.dedup.units import LINE_BITS

COUNTS = (
    "docs_in",
    "exact_duplicates",
    "near_duplicates",
    "near_below_threshold",
    "near_clusters",
    "largest_cluster",
    "decontaminated",
    "docs_out",
    "bytes_out",
)
LARGEST = "largest_cluster"
"""The one count that is a maximum over units, not a sum."""


def _merge(into: Counter, counts: dict[str, int]) -> None:
    """Add a unit's counts to ``into``; the largest cluster is a maximum, not a sum."""
    for key, value in counts.items():
        into[key] = max(into[key], value) if key == LARGEST else into[key] + value


def _doc_id(key: int, files: list[tuple[str, str]]) -> str:
    return f"{files[key >> LINE_BITS][0]}:{key & ((1 << LINE_BITS) - 1)}"


def build_report(
    units: list[dict],
    shards: list[dict],
    clusters: dict[str, Any],
    files: list[tuple[str, str]],
    config: DedupConfig,
) -> dict[str, Any]:
    """report.json: counts per split and pile_set_name, malformed lines per file, the LSH
    parameters and the largest clusters."""
    splits: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for shard in shards:
        for name, counts in shard["components"].items():
            _merge(splits[shard["split"]][name], counts)
    components: dict[str, Counter] = defaultdict(Counter)
    for per_name in splits.values():
        for name, counts in per_name.items():
            _merge(components[name], counts)
    malformed: dict[str, dict[str, Any]] = {}
    for unit in units:
        if unit["malformed"]:
            entry = malformed.setdefault(unit["file"], {"count": 0, "lines": []})
            entry["count"] += unit["malformed"]
            entry["lines"] += unit["malformed_lines"]

    def table(per_name: dict[str, Counter]) -> dict[str, dict[str, int]]:
        return {n: {k: int(c[k]) for k in COUNTS} for n, c in sorted(per_name.items())}

    def total(per_name: dict[str, Counter]) -> dict[str, int]:
        merged: Counter = Counter()
        for counts in per_name.values():
            _merge(merged, counts)
        return {k: int(merged[k]) for k in COUNTS}

    return {
        "totals": {**total(components), "malformed": sum(m["count"] for m in malformed.values())},
        "components": table(components),
        "splits": {
            s: {"totals": total(splits[s]), "components": table(splits[s])} for s in sorted(splits)
        },
        "malformed": malformed,
        "near": _near(clusters, files, config),
    }


def _near(
    clusters: dict[str, Any], files: list[tuple[str, str]], config: DedupConfig
) -> dict[str, Any]:
    """The near phase's settings, pair counts and largest clusters."""
    bands, rows = config.band_shape()
    return {
        "enabled": config.near,
        "bands": bands,
        "rows": rows,
        "threshold": config.threshold,
        "clustering": config.clustering,
        "pair_window": config.pair_window,
        "verify": config.verify,
        # Without verify the shingle sets are not kept: near_below_threshold is not
        # measured and reads 0.
        "similarity_measured": config.verify,
        "candidate_pairs": clusters.get("candidate_pairs", 0),
        "verified_pairs": clusters.get("verified_pairs"),
        "verify_rejected": clusters.get("verify_rejected", 0),
        "clusters": clusters.get("clusters", 0),
        "cluster_samples": [
            {
                "size": s["size"],
                "representative": _doc_id(s["root"], files),
                "members": [_doc_id(m, files) for m in s["members"]],
            }
            for s in clusters.get("samples", [])
        ],
    }


def record_report(ctx: StageContext, report: dict[str, Any], seconds: float) -> None:
    """The report's totals and per-component counts, and the seconds taken, as metrics."""
    metrics: dict[str, float] = {k: float(v) for k, v in report["totals"].items()}
    for name, counts in report["components"].items():
        for key, value in counts.items():
            metrics[f"{key}.{name}"] = float(value)
    metrics["seconds"] = seconds
    ctx.record(**metrics)
