"""The dedup stage's parts on their own: the streaming reader against bad input, MinHash
against exact Jaccard, LSH band choice, and connected components against union-find."""

from __future__ import annotations

import gzip
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import zstandard

from stages.dedup import minhash, survivors
from stages.dedup.components import clusters_by_kept, connected_components
from stages.dedup.phases import bucket_pairs
from stages.dedup.reader import ReadError, iter_lines, iter_records, parse_line
from stages.documents import Document, DocumentFields, Malformed
from tests.dedup_corpus import edited, pile_line, random_text


def write_zst(path: Path, text: str) -> str:
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    return str(path)


def test_reader_counts_lines_across_frames_and_starts_anywhere(tmp_path):
    lines = [pile_line(f"doc {i}") for i in range(50)]
    frames = b"".join(
        zstandard.ZstdCompressor().compress("".join(lines[i : i + 7]).encode())
        for i in range(0, 50, 7)
    )
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(frames)
    got = list(iter_lines(str(path), "multi.jsonl.zst"))
    assert [n for n, _ in got] == list(range(1, 51))
    assert parse_line(got[9][1]) == Document("doc 9", "Pile-CC")
    tail = list(iter_lines(str(path), "multi.jsonl.zst", start_line=44))
    assert [n for n, _ in tail] == list(range(44, 51))
    empty = write_zst(tmp_path / "empty.jsonl.zst", "")
    assert list(iter_lines(empty, "empty.jsonl.zst")) == []
    no_newline = write_zst(tmp_path / "last.jsonl.zst", "a\nb")
    assert list(iter_lines(no_newline, "last.jsonl.zst")) == [(1, b"a"), (2, b"b")]


def test_malformed_lines_say_why():
    assert parse_line(b"not json") == Malformed(
        "not JSON (Expecting value: line 1 column 1 (char 0))"
    )
    assert parse_line(b'{"text": "caf\xe9"}') == Malformed("invalid UTF-8 at byte 13")
    assert parse_line(b'{"meta": {"pile_set_name": "x"}}') == Malformed("missing text")
    assert parse_line(b'{"text": 5, "meta": {}}') == Malformed("text is not a string")
    assert parse_line(b'{"text": "t", "meta": {}}') == Malformed(
        "meta.pile_set_name missing or not a string"
    )
    assert parse_line(b"[1]") == Malformed("not a JSON object")
    assert "surrogate" in parse_line(b'{"text": "\\ud800", "meta": {"pile_set_name": "x"}}').reason


@pytest.mark.parametrize(
    "kind, suffix, compress",
    [
        ("zstd", ".jsonl.zst", zstandard.ZstdCompressor().compress),
        ("gzip", ".json.gz", gzip.compress),
    ],
)
def test_truncated_and_corrupt_streams_name_file_and_offset(tmp_path, kind, suffix, compress):
    data = compress(
        "".join(pile_line(random_text(random.Random(i), 300)) for i in range(200)).encode()
    )
    name = f"cut{suffix}"
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadError, match=rf"{name}: truncated {kind} .* byte {len(data) // 2}"):
        list(iter_lines(str(path), name))
    path.write_bytes(data + b"this is no compressed frame")
    with pytest.raises(ReadError, match=rf"{name}: corrupt {kind} data near compressed byte"):
        list(iter_lines(str(path), name))


def test_gzip_members_stream_like_zstd_frames(tmp_path):
    lines = [pile_line(f"doc {i}") for i in range(50)]
    members = b"".join(gzip.compress("".join(lines[i : i + 7]).encode()) for i in range(0, 50, 7))
    path = tmp_path / "multi.json.gz"
    path.write_bytes(members)
    got = list(iter_records(str(path), "multi.json.gz", start=44))
    assert got == [(n, Document(f"doc {n - 1}", "Pile-CC")) for n in range(44, 51)]


def test_parquet_rows_stream_by_row_group_from_any_row(tmp_path):
    texts = [f"doc {i}" for i in range(23)] + [None]
    table = pa.table(
        {
            "content": texts,
            "meta": [{"source": "web" if i % 2 else None} for i in range(24)],
        }
    )
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=5)
    fields = DocumentFields(
        text_field="content", component_field="meta.source", component="unknown"
    )
    rows = list(iter_records(str(path), "part.parquet", fields=fields))
    assert [n for n, _ in rows] == list(range(1, 25))
    assert rows[0][1] == Document("doc 0", "unknown") and rows[1][1] == Document("doc 1", "web")
    assert rows[-1][1] == Malformed("missing content")
    assert list(iter_records(str(path), "part.parquet", start=12, fields=fields)) == rows[11:]
    with pytest.raises(ReadError, match=r"part.parquet: no column 'text' \(columns: content, meta"):
        list(iter_records(str(path), "part.parquet"))


def test_fields_find_nested_paths_a_constant_or_say_what_is_missing():
    slimpajama = DocumentFields(component_field="meta.redpajama_set_name")
    line = b'{"text": "t", "meta": {"redpajama_set_name": "RedPajamaGithub"}}'
    assert parse_line(line, slimpajama) == Document("t", "RedPajamaGithub")
    assert parse_line(b'{"text": "t", "meta": {}}', slimpajama) == Malformed(
        "meta.redpajama_set_name missing or not a string"
    )
    assert parse_line(b'{"text": "t", "meta": 3}', slimpajama) == Malformed(
        "meta.redpajama_set_name missing or not a string"
    )
    fallback = DocumentFields(component_field="meta.source", component="web")
    assert parse_line(b'{"text": "t"}', fallback) == Document("t", "web")
    assert parse_line(b'{"text": "t", "meta": {"source": "wiki"}}', fallback) == Document(
        "t", "wiki"
    )
    constant = DocumentFields(text_field="doc.body", component_field=None, component="mine")
    assert parse_line(b'{"doc": {"body": "b"}, "meta": {"x": 1}}', constant) == Document(
        "b", "mine"
    )
    assert parse_line(b'{"doc": {}}', constant) == Malformed("missing doc.body")


def test_a_50_mb_document_streams_as_one_line(tmp_path):
    rng = random.Random(0)
    words = random_text(rng, 2000).split()
    text = " ".join(words[i % len(words)] + str(i % 997) for i in range(6_500_000))
    assert len(text) > 50_000_000
    path = write_zst(tmp_path / "big.jsonl.zst", pile_line(text) + pile_line("small"))
    lines = list(iter_lines(path, "big.jsonl.zst"))
    assert [n for n, _ in lines] == [1, 2]
    doc = parse_line(lines[0][1])
    assert isinstance(doc, Document) and doc.text == text
    hashes, offsets = minhash.shingle_hashes([doc.text], "word", 5, True)
    sig = minhash.signatures(hashes, offsets, 128, 1, "one_permutation")
    assert offsets[1] == 6_500_000 - 4 and (sig < np.iinfo(np.uint32).max).all()


@pytest.mark.parametrize("scheme", ["one_permutation", "permutations"])
def test_signatures_estimate_exact_jaccard(scheme):
    rng = random.Random(1)
    base = [random_text(rng, 400) for _ in range(150)]
    near = [edited(rng, t, rng.choice([0.02, 0.05, 0.1, 0.2])) for t in base]
    hashes, offsets = minhash.shingle_hashes(base + near, "word", 5, True)
    truth = np.array(
        [
            minhash.jaccard(
                hashes[offsets[i] : offsets[i + 1]], hashes[offsets[150 + i] : offsets[151 + i]]
            )
            for i in range(150)
        ]
    )
    sig = minhash.signatures(hashes, offsets, 256, 7, scheme)
    estimate = (sig[:150] == sig[150:]).mean(axis=1)
    assert abs((estimate - truth).mean()) < 0.01
    assert np.abs(estimate - truth).mean() < 0.03


def test_pair_jaccard_of_shingle_sets_is_exact():
    rng = random.Random(2)
    base = [random_text(rng, 200) for _ in range(20)]
    docs = base + [edited(rng, t, rate) for t in base for rate in (0.01, 0.2)] + ["", "a"]
    hashes, offsets = minhash.shingle_hashes(docs, "word", 5, True)
    values, set_offsets = minhash.shingle_sets(hashes, offsets)
    a = np.array([rng.randrange(len(docs)) for _ in range(300)] + list(range(20)) + [60])
    b = np.array([rng.randrange(len(docs)) for _ in range(300)] + list(range(20, 60, 2)) + [60])
    truth = [
        minhash.jaccard(hashes[offsets[i] : offsets[i + 1]], hashes[offsets[j] : offsets[j + 1]])
        for i, j in zip(a, b, strict=True)
    ]
    assert np.allclose(minhash.pair_jaccard(values, set_offsets, a, b), truth)
    assert min(truth[300:320]) > 0.5


@pytest.mark.parametrize("window", [1, 8])
def test_bucket_pairs_link_whole_small_buckets_and_chain_large_ones(window):
    small = [(1, k) for k in (30, 10, 20)]
    large = [(2, k) for k in range(100, 100 + window + 3)]
    bucket, key = zip(*(small + large + [(3, 5)]), strict=True)
    block = {"bucket": np.array(bucket, np.uint64), "doc_key": np.array(key)}
    pairs = bucket_pairs(block, window)
    found = set(zip(pairs["a"].tolist(), pairs["b"].tolist(), strict=True))
    assert (10, 20) in found and (20, 30) in found and all(a < b for a, b in found)
    assert ((10, 30) in found) == (window >= 2)
    assert (100, 100 + window) in found and (100, 101 + window) not in found
    expected = sum(min(window, n) for n in range(3)) + sum(
        min(window, n) for n in range(window + 3)
    )
    assert len(found) == expected


def test_char_shingles_and_short_documents():
    hashes, offsets = minhash.shingle_hashes(["abcd", "ab", "", "ABCD"], "char", 3, True)
    assert list(np.diff(offsets)) == [2, 1, 0, 2]
    assert list(hashes[0:2]) == list(hashes[3:5])
    words, word_offsets = minhash.shingle_hashes(["one two", "x " * 10], "word", 5, False)
    assert list(np.diff(word_offsets)) == [1, 6]


def test_band_choice_minimises_weighted_error():
    # The values datasketch's _optimal_param gives for the same arguments.
    assert minhash.choose_bands(0.7, 256, 0.5, 0.5) == (25, 10)
    assert minhash.choose_bands(0.5, 128, 0.5, 0.5) == (25, 5)
    assert minhash.choose_bands(0.8, 128, 0.5, 0.5) == (9, 13)
    assert minhash.choose_bands(0.7, 256, 0.1, 0.9) == (32, 8)


def union_find_roots(edges: np.ndarray) -> dict[int, int]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent if find(x) != x}


@pytest.mark.parametrize("partitions", [1, 4])
def test_connected_components_match_union_find(ray_cluster, partitions):
    rng = np.random.default_rng(partitions)
    edges = rng.integers(0, 3000, size=(2000, 2)) * 11 + 5
    chain = np.stack([np.arange(0, 500), np.arange(1, 501)], axis=1) * 13
    edges = np.concatenate([edges, chain[::-1]])
    blocks = [ray.put(b) for b in np.array_split(edges, 3)]
    removed = connected_components(blocks, partitions)
    pieces = ray.get(removed)
    got = {int(a): int(b) for piece in pieces for a, b in piece}
    want = union_find_roots(edges)
    assert got == want
    assert all((np.diff(p[:, 0]) > 0).all() for p in pieces)
    clusters = clusters_by_kept(removed, partitions)
    sizes = Counter(want.values())
    assert clusters.clusters == len(sizes)
    assert {int(k): int(n) for p in ray.get(clusters.sizes) for k, n in p} == {
        k: n + 1 for k, n in sizes.items()
    }
    largest = max(sizes.values()) + 1
    assert [s.size for s in clusters.samples][:1] == [largest]


def greedy_reference(edges: np.ndarray) -> tuple[set[int], set[int]]:
    """The sequential rule: in id order, a node is kept unless a kept neighbour came first.
    Returns (kept, removed) among the nodes with edges."""
    neighbours: dict[int, set[int]] = defaultdict(set)
    for a, b in edges.tolist():
        if a != b:
            neighbours[a].add(b)
            neighbours[b].add(a)
    kept: set[int] = set()
    for node in sorted(neighbours):
        if not neighbours[node] & kept:
            kept.add(node)
    return kept, set(neighbours) - kept


@pytest.mark.parametrize(("partitions", "local"), [(1, 10**9), (4, 10**9), (3, 0), (4, 700)])
def test_greedy_survivors_match_the_sequential_rule(ray_cluster, monkeypatch, partitions, local):
    """Any partitioning, and rounds finished in one task from any point, give the
    sequential result: removed documents each have a kept neighbour, no edge joins two
    kept ones. The graph holds a long sorted chain (one decision per two rounds) and its
    reverse, a star and random edges."""
    monkeypatch.setattr(survivors, "LOCAL_MESSAGES", local)
    rng = np.random.default_rng(partitions)
    random_edges = rng.integers(0, 2000, size=(2500, 2)) * 7 + 3
    chain = np.stack([np.arange(0, 120), np.arange(1, 121)], axis=1) * 5 + 20_000
    star = np.stack([np.full(40, 30_000), np.arange(30_001, 30_041)], axis=1)
    edges = np.concatenate([random_edges, chain[::-1], chain[:30, ::-1] + 1000, star])
    blocks = [ray.put(b) for b in np.array_split(edges, 3)]
    pieces = ray.get(survivors.greedy_removals(blocks, partitions))
    assert all((np.diff(p[:, 0]) > 0).all() for p in pieces)
    removed_for = {int(a): int(b) for piece in pieces for a, b in piece}
    kept, removed = greedy_reference(edges)
    assert set(removed_for) == removed
    pairs = {(min(a, b), max(a, b)) for a, b in edges.tolist()}
    assert all((rep, doc) in pairs and rep in kept for doc, rep in removed_for.items())
    assert removed_for[30_001] == 30_000 and 30_000 in kept


def test_no_edges_no_components(ray_cluster):
    for removed in (connected_components([], 3), survivors.greedy_removals([], 3)):
        assert [len(p) for p in ray.get(removed)] == [0, 0, 0]
        clusters = clusters_by_kept(removed, 3)
        assert clusters.clusters == 0 and clusters.samples == []
