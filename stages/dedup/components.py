"""Distributed connected components of the near-duplicate candidate graph.

The graph arrives as edge blocks in Ray's object store and never gathers in one process:
each round hash-partitions the edges by node with one Ray task per block (``_scatter``,
one return per partition) and reduces each partition in its own task. The rounds are
Kiveris et al.'s alternating Large-Star / Small-Star ("Connected Components in MapReduce
and Beyond", SoCC 2014), which converge in O(log^2 n) rounds to one star per component
centred on its smallest node:

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

Mode = Literal["symmetric", "oriented", "final"]


@dataclass(frozen=True)
class ClusterSample:
    size: int
    root: int
    members: list[int]


@dataclass
class Components:
    """The finished components: leaf -> root arrays (one object per partition, partitioned
    by leaf, sorted by leaf), how many clusters there are and the largest ones."""

    partitions: list[ray.ObjectRef]
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
    edges = edges[edges[:, 0] != edges[:, 1]]
    if mode == "symmetric":
        edges = np.concatenate([edges, edges[:, ::-1]])
    elif mode == "oriented":
        edges = np.stack([edges.max(axis=1), edges.min(axis=1)], axis=1)
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


def _large_star(*pieces: np.ndarray) -> tuple[np.ndarray, int, list[ClusterSample], int]:
    """Large-Star on one partition: the new edges, the unsettled node count of this input,
    and (meaningful once nothing is unsettled) the largest clusters rooted here and the
    number of roots."""
    u, v, starts = _grouped(pieces)
    if not len(u):
        return np.empty((0, 2), dtype=np.int64), 0, [], 0
    sizes = np.diff(np.append(starts, len(u)))
    first = v[starts]
    group_min = np.minimum(u[starts], first)
    has_smaller = first < u[starts]
    unsettled = int(np.count_nonzero(has_smaller & (sizes > 1)))
    m = np.repeat(group_min, sizes)
    keep = v > u
    out = np.stack([v[keep], m[keep]], axis=1)
    roots = ~has_smaller
    samples = _samples(u[starts][roots], starts[roots], sizes[roots], v)
    return out, unsettled, samples, int(np.count_nonzero(roots))


def _samples(
    roots: np.ndarray, starts: np.ndarray, sizes: np.ndarray, v: np.ndarray
) -> list[ClusterSample]:
    order = np.lexsort((roots, -sizes))[:SAMPLE_MEMBERS]
    return [
        ClusterSample(
            int(sizes[i]) + 1,
            int(roots[i]),
            [int(x) for x in v[starts[i] : starts[i] + min(int(sizes[i]), SAMPLE_MEMBERS)]],
        )
        for i in order
    ]


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


def _sorted_by_leaf(*pieces: np.ndarray) -> np.ndarray:
    edges = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
    return edges[np.argsort(edges[:, 0], kind="stable")]


def _shuffle(
    blocks: list[Any], partitions: int, mode: Mode, reduce: Any, returns: int, remote_args: dict
) -> list[Any]:
    """Scatter every block by key and run ``reduce`` on each partition's pieces."""
    scatter = ray.remote(_scatter).options(num_returns=partitions, **remote_args)
    scattered = [scatter.remote(block, partitions, mode) for block in blocks]
    if partitions == 1:
        scattered = [[piece] for piece in scattered]
    task = ray.remote(reduce).options(num_returns=returns, **remote_args)
    return [task.remote(*[pieces[p] for pieces in scattered]) for p in range(partitions)]


def connected_components(
    blocks: list[Any], partitions: int, remote_args: dict | None = None
) -> Components:
    """The components of the graph whose edges are ``blocks`` (object refs or values of
    ``(n, 2)`` int64 arrays, or tables with columns ``a``, ``b``)."""
    remote_args = {"num_cpus": 1, **(remote_args or {})}
    edges = list(blocks)
    for _ in range(MAX_ROUNDS):
        results = _shuffle(edges, partitions, "symmetric", _large_star, 4, remote_args)
        unsettled = sum(ray.get([r[1] for r in results]))
        edges = [r[0] for r in results]
        if unsettled == 0:
            samples = [s for group in ray.get([r[2] for r in results]) for s in group]
            samples.sort(key=lambda s: (-s.size, s.root))
            clusters = sum(ray.get([r[3] for r in results]))
            final = _shuffle(edges, partitions, "final", _sorted_by_leaf, 1, remote_args)
            return Components(final, clusters, samples[:SAMPLE_MEMBERS])
        edges = _shuffle(edges, partitions, "oriented", _small_star, 1, remote_args)
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
