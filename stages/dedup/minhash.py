"""Hashing for dedup: exact 128-bit text hashes, vectorised shingling and MinHash, LSH bands.

Everything per hash is numpy over whole batches of documents; Python loops only run per
document (encoding its text) or per permutation column (a few hundred at most):

- Shingles: the batch's texts are joined into one array (bytes for word n-grams, code
  points for character n-grams). Every word is hashed at once from prefix sums of its
  bytes (a polynomial mod 2^64); an n-gram's hash combines its n word (or character)
  values with shifted array sums. A document shorter than n gives one shingle of
  everything it has.
- Signatures, either scheme: "permutations" is classic MinHash,
  ``h_k(x) = (a_k * x + b_k) >> 32`` (multiply-shift, ``a_k`` odd, in uint64) over a
  chunk of shingles times all permutations, then ``np.minimum.reduceat`` per document;
  "one_permutation" hashes each shingle once into one of num_perm bins and densifies
  empty bins (Shrivastava and Li), at a num_perm-th of the hashing.
- LSH: ``choose_bands`` picks (b, r) with b * r <= num_perm minimising the weighted
  false-positive and false-negative areas under the S-curve ``1 - (1 - s^r)^b`` (the
  integral datasketch uses); ``band_keys`` hashes each band's r values and the band's
  index into one uint64 bucket key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import xxhash

Normalize = Literal["none", "whitespace", "case", "whitespace_case"]
ShingleKind = Literal["word", "char"]
Scheme = Literal["one_permutation", "permutations"]

_U64 = np.uint64
_WORD_BASE = _U64(0x100000001B3)
_NGRAM_BASE = _U64(0x9E3779B97F4A7C15)
_EMPTY = np.iinfo(np.uint32).max
_WHITESPACE = re.compile(r"\s+")
# Shingles hashed against every permutation at once: bounds the (rows x num_perm) matrix.
_CHUNK_ROWS = 4096
# Text bytes whose word hashes are computed in one step (bounds temporaries to ~24x this).
_WINDOW_BYTES = 2**20
# Bytes that split words: ASCII whitespace (Unicode spaces are rare enough in the Pile to
# fold into words rather than pay for decoding).
_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def normalize_text(text: str, mode: Normalize) -> str:
    """The text exact dedup hashes: as is, whitespace runs folded to one space, lowercased,
    or both."""
    if mode in ("whitespace", "whitespace_case"):
        text = _WHITESPACE.sub(" ", text).strip()
    if mode in ("case", "whitespace_case"):
        text = text.casefold()
    return text


def exact_hash(text: str, mode: Normalize) -> bytes:
    """128-bit hash of the normalised text."""
    return xxhash.xxh3_128_digest(normalize_text(text, mode).encode("utf-8"))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole word."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def _inverse(odd: int) -> int:
    """The multiplicative inverse of an odd number mod 2^64 (Newton's iteration)."""
    inv = odd
    for _ in range(6):
        inv = inv * (2 - odd * inv) % 2**64
    return inv


_POWERS = _powers(_WORD_BASE, _WINDOW_BYTES + 1)
_INVERSE_POWERS = _powers(_U64(_inverse(int(_WORD_BASE))), _WINDOW_BYTES + 1)


def _word_values(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A hash of every word ``data[s:e]`` at once. Over a window, ``sum v[j] B^j`` for a
    word is a difference of prefix sums, and multiplying by ``B^-s`` makes it independent of
    where the word sits (mod 2^64: wrapping is the modulus). Windows of ``_WINDOW_BYTES``
    keep the temporaries small however long a document is; a longer word is cut there."""
    out = np.empty(len(starts), dtype=np.uint64)
    lo = 0
    with np.errstate(over="ignore"):
        while lo < len(starts):
            base = starts[lo]
            hi = int(np.searchsorted(starts, base + _WINDOW_BYTES, side="left"))
            hi = max(hi, lo + 1)
            s = starts[lo:hi] - base
            e = np.minimum(ends[lo:hi] - base, _WINDOW_BYTES)
            window = data[base : base + int(e[-1])]
            prefix = np.zeros(len(window) + 1, dtype=np.uint64)
            np.cumsum(window * _POWERS[: len(window)], out=prefix[1:])
            raw = (prefix[e] - prefix[s]) * _INVERSE_POWERS[s]
            out[lo:hi] = raw ^ ((e - s).astype(np.uint64) * _NGRAM_BASE)
            lo = hi
    return _mix(out)


def _ngrams(
    units: np.ndarray, doc_of_unit: np.ndarray, n_docs: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every window of n consecutive units (word or character hashes) within one
    document, and each shingle's document; a document with fewer than n units (but at least
    one) gives one shingle of all of them."""
    counts = np.bincount(doc_of_unit, minlength=n_docs)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    windows = max(len(units) - n + 1, 0)
    with np.errstate(over="ignore"):
        acc = np.zeros(windows, dtype=np.uint64)
        for k in range(n):
            acc = acc * _NGRAM_BASE + units[k : k + windows]
        valid = doc_of_unit[:windows] == doc_of_unit[n - 1 : n - 1 + windows]
        hashes = [_mix(acc[valid])]
        docs = [doc_of_unit[:windows][valid]]
        short = np.flatnonzero((counts > 0) & (counts < n))
        if len(short):
            tails = np.zeros(len(short), dtype=np.uint64)
            for k in range(n - 1):
                take = counts[short] > k
                idx = first[short[take]] + k
                tails[take] = tails[take] * _NGRAM_BASE + units[idx]
            hashes.append(_mix(tails ^ counts[short].astype(np.uint64)))
            docs.append(short)
    if len(hashes) == 1:
        return hashes[0], docs[0]
    hashes_all = np.concatenate(hashes)
    docs_all = np.concatenate(docs)
    order = np.argsort(docs_all, kind="stable")
    return hashes_all[order], docs_all[order]


def shingle_hashes(
    texts: list[str], kind: ShingleKind, n: int, lowercase: bool
) -> tuple[np.ndarray, np.ndarray]:
    """uint64 hashes of every shingle of every text, grouped by document, and the offsets
    (length ``len(texts) + 1``) where each document's shingles start."""
    if lowercase:
        texts = [t.lower() for t in texts]
    if kind == "word":
        hashes, docs = _word_shingles(texts, n)
    else:
        hashes, docs = _char_shingles(texts, n)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(docs, minlength=len(texts)), out=offsets[1:])
    return hashes, offsets


def _word_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    encoded = [t.encode("utf-8") for t in texts]
    # A space before every document keeps words from running across them.
    data = np.frombuffer(b"".join(b" " + e for e in encoded) + b" ", dtype=np.uint8)
    word = ~_IS_SPACE[data]
    starts = np.flatnonzero(word[1:] & ~word[:-1]) + 1
    ends = np.flatnonzero(word[:-1] & ~word[1:]) + 1
    word_hashes = _word_values(data, starts, ends)
    doc_marks = np.zeros(len(data), dtype=np.int32)
    doc_marks[np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])] = 1
    doc_of_byte = np.cumsum(doc_marks, dtype=np.int32)
    return _ngrams(word_hashes, doc_of_byte[starts] - 1, len(texts), n)


def _char_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    doc_of_char = np.repeat(np.arange(len(texts)), lengths)
    return _ngrams(_mix(codes.astype(np.uint64)), doc_of_char, len(texts), n)


@dataclass(frozen=True)
class Permutations:
    """The num_perm hash functions ``(a * x + b) >> 32``, drawn from a seed."""

    a: np.ndarray
    b: np.ndarray

    @classmethod
    def make(cls, num_perm: int, seed: int) -> Permutations:
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | _U64(1)
        b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
        return cls(a, b)


def signatures(
    hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int, scheme: Scheme
) -> np.ndarray:
    """MinHash signatures (documents x num_perm, uint32) of the shingles grouped by
    ``offsets``; a document without shingles gets every value at the uint32 maximum.
    Either scheme gives slots that agree between two documents with probability equal to
    their Jaccard similarity."""
    if scheme == "permutations":
        return _permutation_signatures(hashes, offsets, Permutations.make(num_perm, seed))
    return _one_permutation_signatures(hashes, offsets, num_perm, seed)


def _permutation_signatures(
    hashes: np.ndarray, offsets: np.ndarray, perms: Permutations
) -> np.ndarray:
    """Classic MinHash: every shingle through every permutation, the minimum per slot."""
    n_docs = len(offsets) - 1
    sig = np.full((n_docs, len(perms.a)), _EMPTY, dtype=np.uint64)
    doc_of_row = np.repeat(np.arange(n_docs), np.diff(offsets))
    buf = np.empty((_CHUNK_ROWS, len(perms.a)), dtype=np.uint64)
    for lo in range(0, len(hashes), _CHUNK_ROWS):
        x = hashes[lo : lo + _CHUNK_ROWS]
        values = buf[: len(x)]
        with np.errstate(over="ignore"):
            np.multiply(x[:, None], perms.a[None, :], out=values)
            np.add(values, perms.b[None, :], out=values)
            np.right_shift(values, _U64(32), out=values)
        docs = doc_of_row[lo : lo + len(x)]
        # Rows are grouped by document: each run of equal docs is one reduceat segment.
        run_starts = np.flatnonzero(np.diff(docs, prepend=-1))
        reduced = np.minimum.reduceat(values, run_starts, axis=0)
        run_docs = docs[run_starts]
        sig[run_docs] = np.minimum(sig[run_docs], reduced)
    return sig.astype(np.uint32)


def _one_permutation_signatures(
    hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int
) -> np.ndarray:
    """One permutation hashing with densification (Shrivastava and Li, ICML 2014): each
    shingle is hashed once, its high bits pick one of num_perm bins and its low bits are
    the value kept if smallest in that bin. An empty bin copies the nearest non-empty bin
    to its right (circularly), mixed with the distance, so two documents agree on it
    exactly when they agree on that bin: the collision probability stays the Jaccard
    similarity, at one hash per shingle instead of num_perm."""
    n_docs = len(offsets) - 1
    with np.errstate(over="ignore"):
        x = _mix(hashes ^ _U64(seed) * _NGRAM_BASE)
        bins = ((x >> _U64(32)) * _U64(num_perm)) >> _U64(32)
        doc_of_row = np.repeat(np.arange(n_docs, dtype=np.uint64), np.diff(offsets))
        sig = np.full(n_docs * num_perm, _EMPTY, dtype=np.uint32)
        np.minimum.at(sig, doc_of_row * _U64(num_perm) + bins, (x & _U64(_EMPTY)).astype(np.uint32))
    sig = sig.reshape(n_docs, num_perm)
    return _densify(sig, offsets)


def _densify(sig: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    empty = sig == _EMPTY
    fill = empty & (np.diff(offsets) > 0)[:, None]
    if not fill.any():
        return sig
    num_perm = sig.shape[1]
    slots = np.arange(2 * num_perm)
    position = np.where(np.tile(empty, 2), 2 * num_perm, slots[None, :])
    # The next non-empty slot to the right: a running minimum from the right end.
    nearest = np.minimum.accumulate(position[:, ::-1], axis=1)[:, ::-1][:, :num_perm]
    rows, cols = np.nonzero(fill)
    donor = nearest[rows, cols]
    distance = (donor - cols).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix(sig[rows, donor % num_perm].astype(np.uint64) + distance * _NGRAM_BASE)
    out = sig.copy()
    out[rows, cols] = (mixed >> _U64(32)).astype(np.uint32)
    return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 bucket key per document and band (documents x bands): equal keys mean
    equal band values, in the same band."""
    keys = np.empty((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            acc = np.full(sig.shape[0], _U64(band + 1) * _NGRAM_BASE, dtype=np.uint64)
            for col in range(band * rows, (band + 1) * rows):
                acc = _mix(acc ^ sig[:, col].astype(np.uint64))
            keys[:, band] = acc
    return keys


@cache
def choose_bands(
    threshold: float, num_perm: int, fp_weight: float, fn_weight: float
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising
    ``fp_weight * FP + fn_weight * FN``, where FP is the area under the S-curve below the
    threshold and FN the area above it missing from it."""
    below = np.linspace(0.0, threshold, 513)
    above = np.linspace(threshold, 1.0, 513)
    best = (np.inf, 1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - below**r) ** b, below)
            fn = np.trapezoid((1 - above**r) ** b, above)
            error = fp_weight * fp + fn_weight * fn
            if error < best[0]:
                best = (error, b, r)
    return best[1], best[2]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two shingle hash sets (as arrays; duplicates ignored)."""
    a, b = np.unique(a), np.unique(b)
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def shingle_sets(hashes: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's shingle hashes (``hashes[offsets[i]:offsets[i + 1]]``) as a sorted set:
    (values, offsets) in the same layout."""
    docs = len(offsets) - 1
    doc = np.repeat(np.arange(docs), np.diff(offsets))
    order = np.lexsort((hashes, doc))
    values, doc = hashes[order], doc[order]
    first = np.ones(len(values), dtype=bool)
    first[1:] = (values[1:] != values[:-1]) | (doc[1:] != doc[:-1])
    counts = np.bincount(doc[first], minlength=docs)
    return values[first], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def pair_jaccard(
    values: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Exact Jaccard similarity of sets ``a[k]`` and ``b[k]`` for every k, where set i is
    ``values[offsets[i]:offsets[i + 1]]`` (sorted, unique, as ``shingle_sets`` gives).

    Each member becomes ``k << 32 | rank`` (rank: its index among the distinct values, so
    equal only for equal shingles), and one sort of those int64s puts the members the two
    sets of pair k share side by side: a third of the time of sorting (pair, value) rows."""
    if len(a) >= 1 << 31:
        raise ValueError(f"{len(a)} pairs in one call: at most 2^31 - 1")
    pairs = np.arange(len(a), dtype=np.int64)
    len_a, len_b = offsets[a + 1] - offsets[a], offsets[b + 1] - offsets[b]
    _, rank = np.unique(values, return_inverse=True)
    rank = rank.astype(np.int64)

    def gather(sets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        starts = np.repeat(offsets[sets] - np.cumsum(lengths) + lengths, lengths)
        return rank[starts + np.arange(int(lengths.sum()))]

    packed = np.concatenate(
        [
            (np.repeat(pairs, len_a) << 32) | gather(a, len_a),
            (np.repeat(pairs, len_b) << 32) | gather(b, len_b),
        ]
    )
    packed.sort()
    shared = packed[1:][packed[1:] == packed[:-1]]
    inter = np.bincount(shared >> 32, minlength=len(a))
    union = len_a + len_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
