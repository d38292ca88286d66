"""The dedup stage run whole on the ``ray_cluster`` fixture: duplicate-detection quality
against exact Jaccard ground truth, byte-identical output across worker counts, on GCS and
after interrupted runs, bad input, and the demo pipeline through the executor."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import zstandard

from pipeline import executor, storage
from pipeline.config import validate
from pipeline.ledger import Ledger
from stages.dedup.reader import MalformedLine, ReadError
from tests.dedup_corpus import (
    ChainedCorpus,
    chained_corpus,
    edited,
    encoded,
    make_download,
    output_files,
    output_rows,
    pile_line,
    random_text,
    rule_figures,
    run_dedup,
    similar_pairs,
)


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChainedCorpus, str]:
    """The chained corpus (``tests/dedup_corpus.py``) as a download output."""
    corpus = chained_corpus(0, families=40, chains=30, templates=6, distinct=300)
    root = tmp_path_factory.mktemp("chained")
    text = "".join(pile_line(d) for d in corpus.docs)
    return corpus, make_download(root / "dl", {"train/00.jsonl.zst": text})


def kept_documents(out: Path) -> set[int]:
    """Indices (lines from 0) of the documents the output keeps."""
    return {int(r["doc_id"].rsplit(":", 1)[1]) - 1 for r in output_rows(out)}


def test_no_document_is_removed_without_a_kept_one_near_it(ray_cluster, chained, tmp_path, capsys):
    """Against exact-Jaccard pairs: the default (greedy) leaves every removed document a
    kept neighbour at the threshold and almost no near pair both kept; connected components
    (the classic rule) chain, on the same corpus and candidates."""
    corpus, download = chained
    pairs = similar_pairs(corpus.docs, 0.7)
    chain_docs = {doc for chain in corpus.chains for doc in chain}
    figures, reports = {}, {}
    for clustering in ("greedy", "components"):
        out = tmp_path / clustering
        run_dedup(download, out, unit_docs=300, partitions=4, clustering=clustering)
        figures[clustering] = rule_figures(len(corpus.docs), kept_documents(out), pairs)
        reports[clustering] = json.loads((out / "report.json").read_text())
    with capsys.disabled():
        print()
        for clustering, found in figures.items():
            print(found.line(f"dedup {clustering} ({len(corpus.docs)} documents)"))
    greedy, components = figures["greedy"], figures["components"]
    assert len(greedy.without_kept_neighbour) <= 0.02 * greedy.removed
    assert not set(greedy.without_kept_neighbour) & chain_docs
    assert len(greedy.both_kept) <= 0.001 * greedy.pairs
    assert set(components.without_kept_neighbour) & chain_docs
    # The report measures what the ground truth shows: the similarity of each removed
    # document to the one kept for it, below the threshold only when chains removed it.
    for clustering, report in reports.items():
        totals = report["totals"]
        assert totals["near_duplicates"] == figures[clustering].removed
        assert report["near"]["clustering"] == clustering
        assert totals["near_clusters"] == report["near"]["clusters"]
        assert totals["largest_cluster"] == max(
            c["largest_cluster"] for c in report["components"].values()
        )
    assert reports["greedy"]["totals"]["near_below_threshold"] == 0
    below = reports["components"]["totals"]["near_below_threshold"]
    assert below >= len(components.without_kept_neighbour) > 0


def test_greedy_clusters_are_the_same_bytes_for_any_workers_and_after_a_kill(
    ray_cluster, chained, tmp_path
):
    _, download = chained
    common = {"unit_docs": 300, "partitions": 4}
    one = tmp_path / "one"
    run_dedup(download, one, parse_concurrency=1, max_workers=1, **common)
    two = tmp_path / "two"
    run_dedup(download, two, parse_concurrency=2, max_workers=2, keep_intermediate=True, **common)
    expected = output_files(one)
    assert output_files(two) == expected
    # Killed while committing the near phase: two of its four partitions had committed.
    forget(
        two,
        lambda name: (
            name.split("/")[0] in ("parse", "parsed", "exact", "sig")
            or name in ("clusters/0000", "clusters/0003")
        ),
    )
    run_dedup(download, two, **common)
    assert output_files(two) == expected
    assert Ledger(str(two)).digest() == Ledger(str(one)).digest()


def mixed_download(root: Path) -> str:
    """Two train files (exact copies across them, a near copy, malformed lines), an empty
    train file, and val/test documents that train also holds."""
    rng = random.Random(3)
    base = [random_text(rng, 120) for _ in range(80)]
    train0 = [pile_line(t, "Pile-CC") for t in base[:40]]
    train0.insert(5, "{broken json\n")
    train0.insert(9, '{"text": 3, "meta": {"pile_set_name": "Pile-CC"}}\n')
    train1 = [pile_line(t, "Github") for t in base[40:70]]
    train1 += [pile_line(base[3], "Pile-CC"), pile_line(edited(rng, base[7], 0.01), "Pile-CC")]
    train1 += [pile_line(base[72], "Github"), pile_line(base[41], "Github")]
    return make_download(
        root,
        {
            "train/00.jsonl.zst": "".join(train0),
            "train/01.jsonl.zst": "".join(train1),
            "train/02.jsonl.zst": "",
            "val.jsonl.zst": "".join(pile_line(t, "Github") for t in base[70:75]),
            "test.jsonl.zst": "".join(pile_line(t, "Pile-CC") for t in base[75:80]),
        },
    )


def forget(out: Path, keep: callable) -> None:
    """Drop every ledger record ``keep`` rejects, as if the run had died before committing
    it, and leave a half-written temporary behind."""
    for record in (out / "_meta" / "units").glob("*.json"):
        if not keep(json.loads(record.read_text())["name"]):
            record.unlink()
    (out / "train").mkdir(exist_ok=True)
    (out / "train" / ".tmp-part-00000.parquet.x").write_bytes(b"half")


def uploaded(local: str, bucket: str) -> str:
    """The files of a local directory copied under ``bucket``; returns their gs:// prefix."""
    remote = storage.join(bucket, "download")
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            storage.write_atomic(
                storage.join(remote, str(path.relative_to(local))), path.read_bytes()
            )
    return remote


def gcs_output_files(output: str) -> dict[str, bytes]:
    """``output_files`` of a gs:// output."""
    found = storage.glob(storage.join(output, "*/part-*.parquet")) + [
        storage.join(output, "report.json")
    ]
    return {uri[len(output) + 1 :]: storage.read_bytes(uri) for uri in found}


def test_same_bytes_with_one_or_two_workers_on_gcs_and_after_interruptions(
    ray_cluster, gcs_bucket, tmp_path
):
    download = mixed_download(tmp_path / "dl")
    common = {"unit_docs": 12, "partitions": 3, "num_perm": 64}
    one = tmp_path / "one"
    run_dedup(download, one, parse_concurrency=1, min_workers=1, max_workers=1, **common)
    two = tmp_path / "two"
    run_dedup(download, two, parse_concurrency=2, max_workers=2, keep_intermediate=True, **common)
    expected = output_files(one)
    assert output_files(two) == expected
    assert Ledger(str(one)).digest() == Ledger(str(two)).digest()
    # Read from and written to GCS (the emulator), work files included.
    on_gcs = storage.join(gcs_bucket, "dedup")
    run_dedup(uploaded(download, gcs_bucket), on_gcs, **common)
    assert gcs_output_files(on_gcs) == expected
    assert Ledger(on_gcs).digest() == Ledger(str(one)).digest()
    assert not storage.list_files(storage.join(on_gcs, "_work"))

    report = json.loads(expected["report.json"])
    assert report["totals"] == {
        "docs_in": 84,
        "docs_out": 80,
        "exact_duplicates": 2,
        "near_duplicates": 1,
        "near_below_threshold": 0,
        "near_clusters": 1,
        "largest_cluster": 2,
        "decontaminated": 1,
        "malformed": 2,
        "bytes_out": report["totals"]["bytes_out"],
    }
    assert report["malformed"]["train/00.jsonl.zst"]["lines"] == [
        [
            6,
            "not JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))",
        ],
        [10, "text is not a string"],
    ]
    assert report["components"]["Github"]["exact_duplicates"] == 1
    doc_ids = [r["doc_id"] for r in output_rows(one)]
    assert doc_ids == sorted(doc_ids, key=lambda d: (d.split(":")[0], int(d.split(":")[1])))
    assert "train/01.jsonl.zst:31" not in doc_ids and "train/00.jsonl.zst:4" in doc_ids
    assert [r["doc_id"] for r in output_rows(one, "val")][0] == "val.jsonl.zst:1"

    # Killed while parsing: only each file's first unit had been committed.
    forget(two, lambda name: name.startswith("parse/") and name.endswith("/00000"))
    run_dedup(download, two, keep_intermediate=True, **common)
    assert output_files(two) == expected
    # Killed while signing, after the exact phase.
    signed = sorted(n.name for n in (two / "_work" / "sig").rglob("*.parquet"))[:1]
    forget(
        two,
        lambda name: (
            name.split("/")[0] in ("parse", "parsed", "exact")
            or (name.startswith("sig/") and name.rsplit("/", 1)[1] + ".parquet" in signed)
        ),
    )
    run_dedup(download, two, **common)
    assert output_files(two) == expected
    assert Ledger(str(two)).digest() == Ledger(str(one)).digest()
    assert not (two / "_work").exists()


def test_bad_input_fails_naming_file_and_place(ray_cluster, tmp_path):
    good = "".join(pile_line(random_text(random.Random(i), 50)) for i in range(30))
    download = make_download(tmp_path / "strict", {"train/00.jsonl.zst": good + "[1, 2]\n"})
    with pytest.raises(MalformedLine, match=r"train/00.jsonl.zst:31: malformed line: not a JSON"):
        run_dedup(download, tmp_path / "out-strict", strict=True)

    data = zstandard.ZstdCompressor().compress(good.encode())
    download = make_download(tmp_path / "cut", {"train/00.jsonl.zst": data[:-20]})
    with pytest.raises(ReadError, match=rf"train/00.jsonl.zst: truncated zstd .* {len(data) - 20}"):
        run_dedup(download, tmp_path / "out-cut")


FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def slimpajama_records() -> dict[str, list[dict]]:
    """Two train files and a val file of SlimPajama-shaped records (the component at
    ``meta.redpajama_set_name``, some without one), holding exact, near and held-out
    duplicates."""
    rng = random.Random(5)
    base = [random_text(rng, 120) for _ in range(60)]

    def record(text: str, component: str | None) -> dict:
        return {"text": text, "meta": {"redpajama_set_name": component, "url": "u"}}

    train0 = [record(t, "RedPajamaC4") for t in base[:30]]
    train1 = [record(t, "RedPajamaGithub" if i % 3 else None) for i, t in enumerate(base[30:55])]
    train1 += [record(base[3], "RedPajamaC4"), record(edited(rng, base[7], 0.01), "RedPajamaC4")]
    train1 += [record(base[56], "RedPajamaC4")]
    return {
        "train/00": train0,
        "train/01": train1,
        "val": [record(t, "RedPajamaC4") for t in base[55:60]],
    }


def without_suffix(value, suffix: str):
    """``value`` (rows or a report) with the file-name suffix ``suffix`` taken out of it."""
    return json.loads(json.dumps(value).replace(suffix, ""))


def test_every_format_gives_the_same_dedup_and_a_killed_parquet_run_resumes(ray_cluster, tmp_path):
    records = slimpajama_records()
    documents = {"component_field": "meta.redpajama_set_name", "component": "unlabelled"}
    common = {"unit_docs": 8, "partitions": 3, "num_perm": 64, "documents": documents}
    results = {}
    for suffix in FORMATS:
        files = {f"{stem}{suffix}": encoded(docs, suffix) for stem, docs in records.items()}
        download = make_download(tmp_path / f"dl{suffix}", files)
        out = tmp_path / f"out{suffix}"
        # Work files kept: the Parquet run is killed afterwards, back to its first units.
        run_dedup(download, out, keep_intermediate=True, **common)
        report = json.loads((out / "report.json").read_text())
        rows = {split: output_rows(out, split) for split in ("train", "val")}
        results[suffix] = without_suffix({"rows": rows, "report": report}, suffix)
        assert sorted(output_files(out)) == sorted(output_files(tmp_path / "out.jsonl"))
    expected = results[".jsonl"]
    assert all(results[suffix] == expected for suffix in FORMATS)
    totals = expected["report"]["totals"]
    assert (totals["exact_duplicates"], totals["near_duplicates"], totals["decontaminated"]) == (
        1,
        1,
        1,
    )
    assert "unlabelled" in expected["report"]["components"]
    assert expected["rows"]["train"][0]["doc_id"] == "train/00:1"

    # Killed while parsing a Parquet file: only its first unit had been committed.
    parquet = tmp_path / "out.parquet"
    finished = output_files(parquet)
    forget(parquet, lambda name: name.startswith("parse/") and name.endswith("/00000"))
    run_dedup(str(tmp_path / "dl.parquet"), parquet, **common)
    assert output_files(parquet) == finished


def test_a_parquet_file_without_the_text_column_fails_naming_both(ray_cluster, tmp_path):
    good = [
        {"text": random_text(random.Random(i), 40), "meta": {"pile_set_name": "A"}}
        for i in range(3)
    ]
    bad = [{"body": "no text column", "meta": {"pile_set_name": "A"}}]
    files = {"train/00.parquet": encoded(good, ".parquet")}
    files["train/01.parquet"] = encoded(bad, ".parquet")
    download = make_download(tmp_path / "dl", files)
    with pytest.raises(ReadError, match=r"train/01.parquet: no column 'text' \(columns: body"):
        run_dedup(download, tmp_path / "out")
    # The good file's units commit (the failure waits for them) and serve the rerun.
    assert Ledger(str(tmp_path / "out")).is_committed("parsed/train/00.parquet")


def run_demo_dedup(root: Path) -> dict:
    """The demo's corpus, download and dedup stages (on a small corpus) under ``root``;
    returns each stage's outcome."""
    config = validate(
        {
            "name": "demo-dedup",
            "root": str(root),
            "stages": {
                "demo_corpus": {"max_text_mb": 1, "math_documents": 100},
                "download": {},
                "dedup": {"unit_docs": 200, "partitions": 4},
            },
        }
    )
    results = executor.run_pipeline(config, ["dedup"], False, "test")
    for name, outcome in results.items():
        assert not isinstance(outcome, BaseException), (name, outcome)
    return results


@pytest.fixture(scope="module")
def demo_dedup(ray_cluster, tmp_path_factory) -> dict:
    """One run of the demo's download and dedup, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("demo-dedup") / "root"
    yield run_demo_dedup(root)
    shutil.rmtree(root)


def test_demo_pipeline_removes_the_standard_librarys_duplicates(demo_dedup):
    outcome = demo_dedup["dedup"]
    out = Path(outcome.upstream.uri)
    report = json.loads((out / "report.json").read_text())
    github = report["components"]["Github"]
    # The demo injects 4 exact copies, 8 one-line edits and 4 leaked held-out documents;
    # vendored copies in the ensurepip wheels add real exact duplicates on top.
    assert (
        github["exact_duplicates"] + report["components"]["DM Mathematics"]["exact_duplicates"] >= 4
    )
    assert report["totals"]["decontaminated"] >= 1
    assert report["totals"]["near_duplicates"] >= 1
    assert report["near"]["cluster_samples"]
    assert outcome.metrics["docs_out"] == report["totals"]["docs_out"]


def test_digests_do_not_depend_on_the_pipeline_root(demo_dedup, tmp_path):
    """The same corpus downloaded and deduplicated under another root (another directory
    depth, so no path under it can line up by chance) gives the same stage digests."""
    elsewhere = run_demo_dedup(tmp_path / "another" / "root")
    for stage in ("demo_corpus", "download", "dedup"):
        here, there = demo_dedup[stage].upstream, elsewhere[stage].upstream
        assert here.uri != there.uri
        assert here.digest == there.digest, stage
    manifest = json.loads(Path(elsewhere["download"].upstream.uri, "manifest.json").read_text())
    assert all(not f["source"].startswith(str(tmp_path)) for f in manifest["files"])
