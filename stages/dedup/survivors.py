"""Which near-duplicates survive without chaining: the greedy maximal independent set of the
verified-pair graph, the smallest doc_id first, computed in distributed rounds.

Sequentially: walk the documents in doc_id order; keep one unless a kept neighbour came
before it, then it is removed *for* that neighbour. Every removed document therefore has a
kept document it is near (an edge of the graph), and no edge joins two kept documents. The
result is unique (the lexicographically first maximal independent set), so any way of
computing it gives the same bytes.

Distributed, each round is one shuffle of messages keyed by the node they are for: an
*announcement* ``(u, v)`` says v was undecided in the last round and is u's neighbour; a
*removal* ``(u, ~v)`` (the payload's bit complement, negative) says kept node v removes u.
Each node, in its partition's reduce:

- removed by any message: decided, removed for the smallest such v;
- otherwise, smaller than every neighbour that announced: kept, and removes them all;
- otherwise: still undecided, and announces itself to its neighbours.

A node decided in a round is remembered by its partition for the next round only, where
the announcements its neighbours sent before hearing of it are dropped; after that nobody
sends it anything. A removed node may delay a larger neighbour's decision by one round
(its last announcement is still on its way) but never changes it. Nodes that announce to
nobody are kept; rounds end when no messages are left. The round count is bounded by the
longest chain of decisions waiting on a smaller neighbour; once at most
``LOCAL_MESSAGES`` messages are left, the remaining rounds run in one task (same rounds,
same result), so a long tail costs no more Ray round trips.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from stages.dedup.components import shuffle, sorted_by_key

LOCAL_MESSAGES = 2_000_000
"""At most this many messages (16 bytes each) left: the remaining rounds run in one task."""
MAX_ROUNDS = 1_000_000
"""A bound no graph of distinct doc_ids reaches (every two rounds decide its smallest
undecided node); meeting it means a bug, not a hard graph."""

_EMPTY = np.empty((0, 2), dtype=np.int64)


def _round(
    just_decided: np.ndarray, *pieces: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One round on one partition's messages: the next round's messages, the nodes decided
    now, the (removed, kept) pairs decided now, and how many messages go on."""
    messages = np.concatenate(pieces) if pieces else _EMPTY
    messages = messages[~np.isin(messages[:, 0], just_decided)]
    removal = messages[:, 1] < 0
    removals = messages[removal]
    removals = removals[np.argsort(removals[:, 0], kind="stable")]
    removed, first = np.unique(removals[:, 0], return_index=True)
    removed_for = np.minimum.reduceat(~removals[:, 1], first) if len(first) else removed
    announced = messages[~removal & ~np.isin(messages[:, 0], removed)]
    announced = np.unique(announced, axis=0) if len(announced) else _EMPTY
    node, neighbour = announced[:, 0], announced[:, 1]
    starts = np.flatnonzero(np.diff(node, prepend=-1)) if len(node) else np.empty(0, np.int64)
    wins = node[starts] < neighbour[starts]
    kept = np.repeat(wins, np.diff(np.append(starts, len(node))))
    outgoing = np.stack([neighbour, np.where(kept, ~node, node)], axis=1)
    decided = np.union1d(removed, node[starts][wins])
    return outgoing, decided, np.stack([removed, removed_for], axis=1), len(outgoing)


def _finish(partitions: int, *arrays: np.ndarray) -> np.ndarray:
    """The remaining rounds in one task: the first ``partitions`` arrays are the nodes each
    partition decided last, the rest the messages left."""
    decided = np.concatenate(arrays[:partitions])
    messages = np.concatenate(arrays[partitions:]) if arrays[partitions:] else _EMPTY
    removals = []
    for _ in range(MAX_ROUNDS):
        if not len(messages):
            return sorted_by_key(*removals)
        messages, decided, removed, _ = _round(decided, messages)
        removals.append(removed)
    raise RuntimeError(f"greedy survivors did not finish in {MAX_ROUNDS} rounds")


def greedy_removals(
    blocks: list[Any], partitions: int, remote_args: dict | None = None
) -> list[ray.ObjectRef]:
    """The documents removed by the greedy independent set of the graph whose edges are
    ``blocks`` (refs or values of ``(n, 2)`` arrays, or tables with columns ``a``, ``b``),
    as (removed, kept) arrays, one per partition, partitioned by removed and sorted."""
    remote_args = {"num_cpus": 1, **(remote_args or {})}
    messages = list(blocks)
    mode = "symmetric"
    decided: list[Any] = [np.empty(0, np.int64)] * partitions
    removals: list[Any] = []
    for _ in range(MAX_ROUNDS):
        results = shuffle(messages, partitions, mode, _round, 4, remote_args, leading=decided)
        mode = "keyed"
        messages = [r[0] for r in results]
        decided = [r[1] for r in results]
        removals += [r[2] for r in results]
        if sum(ray.get([r[3] for r in results])) <= LOCAL_MESSAGES:
            finish = ray.remote(_finish).options(**remote_args)
            removals.append(finish.remote(partitions, *decided, *messages))
            return shuffle(removals, partitions, "keyed", sorted_by_key, 1, remote_args)
    raise RuntimeError(f"greedy survivors did not finish in {MAX_ROUNDS} rounds")
