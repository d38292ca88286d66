"""The dedup stage's config: how files are cut into units, exact and near-duplicate rules,
and how many workers do the work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.stage import StageConfig
from stages.dedup.minhash import Normalize, Scheme, ShingleKind, choose_bands
from stages.documents import DocumentFields


class DedupConfig(StageConfig):
    """Exact dedup, held-out decontamination and MinHash-LSH near dedup of the download."""

    unit_docs: int = Field(default=100_000, ge=1)
    """Records (lines or Parquet rows) per unit at most: a file's stream is cut into units
    of consecutive records, each parsed, hashed and written on its own (one output shard
    per unit)."""
    unit_mb: float = Field(default=256.0, gt=0)
    """Text per unit at most, in 10^6 UTF-8 bytes (a unit ends after the line that reaches
    it, so one long document makes a unit of its own)."""
    strict: bool = False
    """Fail on the first malformed record (naming file and line or row) instead of counting
    and skipping it."""
    documents: DocumentFields = DocumentFields()
    """Where each record keeps its text and component (``text_field``, ``component_field``,
    ``component``)."""
    exact: bool = True
    """Remove train documents whose text hash equals an earlier train document's (the one
    with the smallest doc_id survives)."""
    normalize: Normalize = "none"
    """What the exact hash sees: the text as is, whitespace runs folded ("whitespace"),
    case folded ("case"), or both ("whitespace_case")."""
    decontaminate: bool = True
    """Remove train documents whose exact hash occurs in val or test (as the Pile did)."""
    near: bool = True
    """Remove train near-duplicates found by MinHash LSH (val and test are left as they are:
    they are what train is compared against)."""
    shingle: ShingleKind = "word"
    """Shingles: word n-grams (words split at ASCII whitespace) or character n-grams."""
    ngram: int = Field(default=5, ge=1, le=64)
    """n of the n-grams; a shorter document is one shingle of everything it has."""
    lowercase: bool = True
    """Lowercase text before shingling."""
    num_perm: int = Field(default=256, ge=8, le=1024)
    """MinHash signature length."""
    scheme: Scheme = "one_permutation"
    """How signatures are hashed: "one_permutation" (one hash per shingle, densified; fast)
    or "permutations" (num_perm hashes per shingle, classic MinHash)."""
    threshold: float = Field(default=0.7, gt=0, lt=1)
    """Jaccard similarity from which two documents are near-duplicates: chooses (bands,
    rows) unless both are given, and is the bar of ``verify``."""
    bands: int | None = Field(default=None, ge=1)
    """LSH bands (with ``rows``); bands * rows must not exceed num_perm."""
    rows: int | None = Field(default=None, ge=1)
    """Signature values per band (with ``bands``)."""
    fp_weight: float = Field(default=0.1, ge=0)
    """Weight of false positives when (bands, rows) are chosen from the threshold: low by
    default, since ``verify`` drops them (at the cost of verifying more candidates)."""
    fn_weight: float = Field(default=0.9, ge=0)
    """Weight of false negatives when (bands, rows) are chosen from the threshold: a pair
    LSH misses is a pair of near-duplicates both kept. At 0.7, 0.9 gives 32x8 bands (85%
    of pairs at exactly 0.7 become candidates, 97% at 0.75; 0.5 gives 25x10: 51%, 77%);
    on ``tests/test_dedup.py``'s chained corpus that takes the pairs at or above the
    threshold left both kept from 0.94% to 0%, for 1.8x the candidates verified."""
    verify: bool = True
    """Link two LSH candidates only when the exact Jaccard similarity of their shingle sets
    reaches the threshold (keeps every unit's shingle sets under ``_work/``): precision then
    no longer rests on the band shape, which can favour recall (``fn_weight``)."""
    pair_window: int = Field(default=8, ge=1)
    """Candidate pairs of an LSH bucket: each member (in doc_id order) with this many next
    members, so every pair of a bucket of up to ``pair_window + 1`` documents and a chain
    through a larger one (``benchmarks/dedup.py --study-window`` measures the trade)."""
    clustering: Literal["greedy", "components"] = "greedy"
    """How verified pairs decide what is removed. ``greedy``: documents in doc_id order,
    each kept unless a kept document it is near came before it (then it is removed for
    that one), so every removed document has a kept one within the threshold.
    ``components``: connected components, one document kept per component (what datatrove
    and most MinHash pipelines do): chains of pairs remove documents that are near no kept
    one."""
    seed: int = 42
    """Seed of the MinHash hash functions."""
    partitions: int = Field(default=16, ge=1, le=4096)
    """Hash partitions of the exact-hash and connected-component shuffles (also the number
    of their ledger units)."""
    cluster_samples: int = Field(default=5, ge=0, le=10)
    """Largest near-duplicate clusters listed, with their doc_ids, in report.json."""
    min_workers: int = Field(default=1, ge=1)
    """Smallest size of the signature actor pool."""
    max_workers: int = Field(default=4, ge=1)
    """Largest size of the signature actor pool (Ray adds actors, and nodes, under load)."""
    parse_concurrency: int = Field(default=4, ge=1)
    """Files parsed at the same time (one Ray task each) and output shards written at once."""
    batch_mb: float = Field(default=8.0, gt=0)
    """Text hashed per signature batch inside a worker, in 10^6 bytes (bounds its memory)."""
    shared_filesystem: bool = False
    """A local output directory is visible to every node (NFS, or a fake multi-node
    cluster on one machine); otherwise its work is kept on the driver's node."""
    keep_intermediate: bool = False
    """Keep ``_work/`` (parsed units, hashes, signatures, clusters) after a successful run."""

    volatile_fields = frozenset(
        {
            "min_workers",
            "max_workers",
            "parse_concurrency",
            "batch_mb",
            "shared_filesystem",
            "keep_intermediate",
        }
    )

    @model_validator(mode="after")
    def _consistent(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither (then threshold picks them)")
        if self.bands is not None and self.bands * (self.rows or 1) > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * (self.rows or 1)} > num_perm")
        if self.min_workers > self.max_workers:
            raise ValueError("min_workers must not exceed max_workers")
        return self

    def band_shape(self) -> tuple[int, int]:
        """(bands, rows): as given, or the best for the threshold."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return choose_bands(self.threshold, self.num_perm, self.fp_weight, self.fn_weight)

    @property
    def unit_bytes(self) -> int:
        return max(1, int(self.unit_mb * 1e6))

    @property
    def batch_bytes(self) -> int:
        return max(1, int(self.batch_mb * 1e6))
