"""The dedup stage: exact and MinHash-LSH near-duplicate removal of the downloaded document
files.

``reader`` streams JSON lines (plain, zstd, gzip) and Parquet, ``minhash`` hashes texts,
``survivors`` decides which near-duplicates are removed for which kept ones (the greedy
independent set), ``components`` holds the graph shuffle, connected components and the
grouping into clusters, ``report`` builds ``report.json``, ``units`` and ``phases`` do
each phase's work on one unit, and ``stage`` runs the phases and registers the stage
(importing this package registers it).
"""

from stages.dedup.config import DedupConfig
from stages.dedup.stage import run

__all__ = ["DedupConfig", "run"]
