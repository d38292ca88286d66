"""Distributed passes over the near-duplicate graph: the shuffle they share, connected
components (the classic clustering), and the grouping of removed documents by the kept
document they were removed for.

The graph arrives as edge blocks in Ray's object store and never gathers in one process:
each round hash-partitions the edges by node with one Ray task per block (``_scatter``,
one return per partition) and reduces each partition in its own task. Connected components
are Kiveris et al.'s alternating Large-Star / Small-Star ("Connected Components in
MapReduce and Beyond", SoCC 2014), which converge in O(log^2 n) rounds to one star per
component centred on its smallest node:

- Large-Star at node u (all neighbours): every larger neighbour is linked to
  m = min(u, neighbours).
- Small-Star at node u (its smaller neighbours): each of them and u is linked to their
  minimum.

The graph is final when every node either has only larger neighbours (a root) or exactly
one neighbour, smaller (a leaf); each Large-Star reduce counts the nodes that are neither,
and the round where none are left returns (leaf, root) pairs, partitioned by leaf and
sorted. Node ids are int64 and the smallest id of a component is its representative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray

# Rounds after which the graph is known not to be converging (the bound is O(log^2 n)).
MAX_ROUNDS = 200
# Members listed for each sampled cluster.
SAMPLE_MEMBERS = 10

Mode = Literal["symmetric", "oriented", "reversed", "keyed"]
"""How ``_scatter`` keys an edge (a, b): by both ends, by its larger end pointing to its
smaller, by b, or as given (by a)."""


@dataclass(frozen=True)
class ClusterSample:
    size: int
    root: int
    members: list[int]


@dataclass
class Clusters:
    """Removed documents grouped by the kept document they were removed for: (kept, size)
    arrays (one object per partition, partitioned by kept document, sorted), how many
    clusters there are and the largest ones."""

    sizes: list[ray.ObjectRef]
    clusters: int
    samples: list[ClusterSample]


def _as_edges(block: Any) -> np.ndarray:
    """An edge block (an ``(n, 2)`` array or a table with columns ``a`` and ``b``) as an
    ``(n, 2)`` int64 array."""
    if isinstance(block, np.ndarray):
        return block.reshape(-1, 2).astype(np.int64, copy=False)
    table = block if isinstance(block, pa.Table) else pa.table(block)
    a = table.column("a").to_numpy().astype(np.int64)
    b = table.column("b").to_numpy().astype(np.int64)
    return np.stack([a, b], axis=1)


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Which partition each int64 key belongs to (a mixed hash, the same on every node)."""
    x = keys.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(29))
    return (x % np.uint64(partitions)).astype(np.int64)


def _scatter(block: Any, partitions: int, mode: Mode) -> tuple[np.ndarray, ...] | np.ndarray:
    """Edges keyed for the next reduce (column 0 is the key), split by partition."""
    edges = _as_edges(block)
    if mode == "symmetric":
        edges = edges[edges[:, 0] != edges[:, 1]]
        edges = np.concatenate([edges, edges[:, ::-1]])
    elif mode == "oriented":
        edges = edges[edges[:, 0] != edges[:, 1]]
        edges = np.stack([edges.max(axis=1), edges.min(axis=1)], axis=1)
    elif mode == "reversed":
        edges = edges[:, ::-1]
    part = partition_of(edges[:, 0], partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(1, partitions))
    pieces = tuple(np.split(edges[order], bounds))
    return pieces if partitions > 1 else pieces[0]


def _grouped(pieces: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (key, neighbour) rows sorted, and where each key's group starts."""
    edges = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
    edges = np.unique(edges, axis=0) if len(edges) else edges
    u, v = edges[:, 0], edges[:, 1]
    starts = np.flatnonzero(np.diff(u, prepend=u[0] - 1)) if len(u) else np.empty(0, np.int64)
    return u, v, starts


def _large_star(*pieces: np.ndarray) -> tuple[np.ndarray, int]:
    """Large-Star on one partition: the new edges, and the unsettled node count of this
    input."""
    u, v, starts = _grouped(pieces)
    if not len(u):
        return np.empty((0, 2), dtype=np.int64), 0
    sizes = np.diff(np.append(starts, len(u)))
    first = v[starts]
    group_min = np.minimum(u[starts], first)
    has_smaller = first < u[starts]
    unsettled = int(np.count_nonzero(has_smaller & (sizes > 1)))
    m = np.repeat(group_min, sizes)
    keep = v > u
    return np.stack([v[keep], m[keep]], axis=1), unsettled


def _small_star(*pieces: np.ndarray) -> np.ndarray:
    """Small-Star on one partition of (larger, smaller) edges."""
    u, v, starts = _grouped(pieces)
    if not len(u):
        return np.empty((0, 2), dtype=np.int64)
    sizes = np.diff(np.append(starts, len(u)))
    m = np.repeat(v[starts], sizes)
    links = np.stack([v, m], axis=1)[v != m]
    centre = np.stack([u[starts], v[starts]], axis=1)
    return np.concatenate([links, centre])


def sorted_by_key(*pieces: np.ndarray) -> np.ndarray:
    """One partition's rows, concatenated and sorted by column 0."""
    edges = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
    return edges[np.argsort(edges[:, 0], kind="stable")]


def shuffle(
    blocks: list[Any],
    partitions: int,
    mode: Mode,
    reduce: Any,
    returns: int,
    remote_args: dict,
    leading: list[Any] | None = None,
) -> list[Any]:
    """Scatter every block by key and run ``reduce`` on each partition's pieces, after the
    partition's ``leading`` argument when one is given."""
    scatter = ray.remote(_scatter).options(num_returns=partitions, **remote_args)
    scattered = [scatter.remote(block, partitions, mode) for block in blocks]
    if partitions == 1:
        scattered = [[piece] for piece in scattered]
    task = ray.remote(reduce).options(num_returns=returns, **remote_args)
    first = [() if leading is None else (leading[p],) for p in range(partitions)]
    return [task.remote(*first[p], *[pieces[p] for pieces in scattered]) for p in range(partitions)]


def connected_components(
    blocks: list[Any], partitions: int, remote_args: dict | None = None
) -> list[ray.ObjectRef]:
    """The components of the graph whose edges are ``blocks`` (object refs or values of
    ``(n, 2)`` int64 arrays, or tables with columns ``a``, ``b``), as (member, smallest
    member) arrays, one per partition, partitioned by member and sorted."""
    remote_args = {"num_cpus": 1, **(remote_args or {})}
    edges = list(blocks)
    for _ in range(MAX_ROUNDS):
        results = shuffle(edges, partitions, "symmetric", _large_star, 2, remote_args)
        unsettled = sum(ray.get([r[1] for r in results]))
        edges = [r[0] for r in results]
        if unsettled == 0:
            return shuffle(edges, partitions, "keyed", sorted_by_key, 1, remote_args)
        edges = shuffle(edges, partitions, "oriented", _small_star, 1, remote_args)
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")


def _sizes(*pieces: np.ndarray) -> tuple[np.ndarray, list[ClusterSample], int]:
    """One partition of (kept, removed) rows: (kept, cluster size) sorted by kept, the
    largest clusters kept here, and how many clusters."""
    rows = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    kept, starts, counts = np.unique(rows[:, 0], return_index=True, return_counts=True)
    order = np.lexsort((kept, -counts))[:SAMPLE_MEMBERS]
    samples = [
        ClusterSample(
            int(counts[i]) + 1,
            int(kept[i]),
            [int(x) for x in rows[starts[i] : starts[i] + min(int(counts[i]), SAMPLE_MEMBERS), 1]],
        )
        for i in order
    ]
    return np.stack([kept, counts + 1], axis=1).astype(np.int64), samples, len(kept)


def clusters_by_kept(
    removed: list[Any], partitions: int, remote_args: dict | None = None
) -> Clusters:
    """The clusters of (removed, kept) partitions: each kept document with the documents
    removed for it."""
    remote_args = {"num_cpus": 1, **(remote_args or {})}
    results = shuffle(removed, partitions, "reversed", _sizes, 3, remote_args)
    samples = [s for group in ray.get([r[1] for r in results]) for s in group]
    samples.sort(key=lambda s: (-s.size, s.root))
    clusters = sum(ray.get([r[2] for r in results]))
    return Clusters([r[0] for r in results], clusters, samples[:SAMPLE_MEMBERS])
