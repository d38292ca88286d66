"""Dedup benchmark: MinHash signature throughput per core against datasketch, and the whole
stage's MB/s and peak memory at two corpus sizes, and its MB/s on the larger corpus as
Parquet beside ``.jsonl.zst`` (a format should never be a slow path), measured in one run.
With ``--clustering-mb``, also the whole stage in both clustering modes beside datatrove's
MinHash pipeline on a generated chained corpus of that many MB (``benchmarks/
datatrove_baseline.py``), same files and cores.

    pip install datasketch   # the baseline; not a meshline dependency
    python benchmarks/dedup.py [--docs 2000] [--sizes 4 8]
    pip install datatrove spacy   # for --clustering-mb
    python benchmarks/dedup.py --clustering-mb 100
    python benchmarks/dedup.py --study-window   # pairing window and band shape vs the rule

Signatures: the same documents, word 5-grams (lowercased), 256 slots, one core; datasketch
gets its fastest path (``MinHash.update_batch`` over the encoded shingles). The stage runs
on a local 2-CPU Ray cluster over generated Pile files of the given sizes (MB of text);
peak RSS is sampled every 0.1 s over this process and every Ray process it started: the
largest single process (a worker) and the largest sum.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.dedup import minhash  # noqa: E402
from tests.dedup_corpus import (  # noqa: E402
    chained_corpus,
    edited,
    encoded,
    make_download,
    output_rows,
    pile_record,
    random_text,
    rule_figures,
    run_dedup,
    similar_pairs,
)

NUM_PERM = 256
NGRAM = 5


def corpus(docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(docs):
        text = random_text(rng, rng.randint(100, 1500))
        out.append(text)
        if rng.random() < 0.2:
            out.append(edited(rng, text, 0.02))
    return out


def ours(texts: list[str], scheme: str) -> float:
    started = time.perf_counter()
    hashes, offsets = minhash.shingle_hashes(texts, "word", NGRAM, True)
    minhash.signatures(hashes, offsets, NUM_PERM, 1, scheme)
    return time.perf_counter() - started


def datasketch_baseline(texts: list[str]) -> float:
    from datasketch import MinHash

    started = time.perf_counter()
    for text in texts:
        words = text.lower().split()
        shingles = [" ".join(words[i : i + NGRAM]).encode() for i in range(len(words) - NGRAM + 1)]
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch(shingles or [" ".join(words).encode()])
    return time.perf_counter() - started


class PeakRss:
    """Samples the RSS of this process and all its descendants."""

    def __init__(self) -> None:
        self.largest = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.1):
            sizes = []
            for proc in [me, *me.children(recursive=True)]:
                try:
                    sizes.append(proc.memory_info().rss)
                except psutil.Error:
                    continue
            self.largest = max(self.largest, max(sizes))
            self.total = max(self.total, sum(sizes))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_corpus(mb: float) -> list[dict]:
    """Pile records of about ``mb`` MB of text, a tenth of them near-duplicates."""
    rng = random.Random(int(mb * 10))
    records, size = [], 0
    while size < mb * 1e6:
        text = random_text(rng, rng.randint(100, 1500))
        if rng.random() < 0.1:
            text = edited(rng, text, 0.02)
        records.append(pile_record(text))
        size += len(text)
    return records


def stage_run(records: list[dict], suffix: str, work: Path) -> tuple[float, float, int, int]:
    """The stage over ``records`` written as four train files and a val file of format
    ``suffix``: (MB of text, seconds, peak RSS of the largest process, of all)."""
    files = {f"train/{k:02d}{suffix}": encoded(records[k::4], suffix, 1000) for k in range(4)}
    files[f"val{suffix}"] = encoded(records[:20], suffix)
    size = sum(len(r["text"]) for r in records) / 1e6
    download = make_download(work / f"dl-{size:.0f}{suffix}", files)
    with PeakRss() as rss:
        started = time.perf_counter()
        out = work / f"out-{size:.0f}{suffix}"
        run_dedup(download, out, unit_docs=5000, partitions=8, max_workers=2)
        seconds = time.perf_counter() - started
    return size, seconds, rss.largest, rss.total


def write_chained_corpus(mb: float, root: Path, distinct: int, files: int = 8) -> float:
    """``tests.dedup_corpus.chained_corpus`` blocks (40 edit families, 30 chains, 6 template
    families and ``distinct`` unrelated documents each) until ``mb`` MB of text, as
    ``files`` plain JSON-lines files with an ``id`` (what datatrove reads) under ``root``;
    returns the MB written."""
    docs: list[str] = []
    size, seed = 0, 0
    while size < mb * 1e6:
        block = chained_corpus(seed, 40, 30, 6, distinct).docs
        docs += block
        size += sum(len(d) for d in block)
        seed += 1
    root.mkdir(parents=True)
    for k in range(files):
        lines = [
            json.dumps({"text": d, "id": f"{k}:{i}", "meta": {"pile_set_name": "Pile-CC"}})
            for i, d in enumerate(docs[k::files])
        ]
        (root / f"train-{k:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return size / 1e6


def clustering_runs(mb: float, distinct: int, work: Path) -> None:
    """Both clustering modes of the stage and datatrove's pipeline on one chained corpus."""
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from datatrove_baseline import datatrove_minhash

    corpus = work / "chained"
    size = write_chained_corpus(mb, corpus, distinct)
    download = make_download(
        work / "chained-dl", {p.name: p.read_bytes() for p in sorted(corpus.glob("*.jsonl"))}
    )
    seconds: dict[str, float] = {}
    removed: dict[str, int] = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for mode in ("greedy", "components"):
            started = time.perf_counter()
            ctx = run_dedup(
                download, work / mode, unit_docs=5000, partitions=8, max_workers=2, clustering=mode
            )
            seconds[mode] = time.perf_counter() - started
            removed[mode] = int(ctx.metrics["near_duplicates"])
    finally:
        ray.shutdown()
    baseline = datatrove_minhash(corpus, work / "datatrove", workers=2)
    print(
        f"whole stage on a {size:.0f} MB chained corpus ({distinct} unrelated documents per "
        "block of 575 in near-duplicate groups), 2 CPUs, beside datatrove's MinHash:"
    )
    for mode in seconds:
        print(
            f"  meshline {mode:>10}: {size / seconds[mode]:6.2f} MB/s "
            f"({seconds[mode]:6.1f} s, {removed[mode]} near-duplicates removed) "
            f"{baseline.seconds / seconds[mode]:5.1f}x datatrove"
        )
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in baseline.step_seconds.items())
    print(
        f"  datatrove {'minhash':>9}: {size / baseline.seconds:6.2f} MB/s "
        f"({baseline.seconds:6.1f} s: {steps}; {len(baseline.removed)} removed)   1.0x"
    )


STUDY = (
    ("clustering: components", {"clustering": "components", "fp_weight": 0.5, "fn_weight": 0.5}),
    ("window 2, bands 25x10", {"pair_window": 2, "fp_weight": 0.5, "fn_weight": 0.5}),
    ("window 8, bands 25x10", {"pair_window": 8, "fp_weight": 0.5, "fn_weight": 0.5}),
    ("window 32, bands 25x10", {"pair_window": 32, "fp_weight": 0.5, "fn_weight": 0.5}),
    ("window 8, bands 32x8 (default)", {}),
    ("window 32, bands 32x8", {"pair_window": 32}),
)
"""Settings the pairing study compares (fn/fp weights 0.5 give 25x10 bands at 0.7)."""


def window_study(work: Path) -> None:
    """Candidate pairs, verified pairs and the near-duplicate rule against exact Jaccard, on
    ``tests/test_dedup.py``'s chained corpus, for pairing windows and band shapes."""
    import ray

    corpus = chained_corpus(0, families=40, chains=30, templates=6, distinct=300)
    pairs = similar_pairs(corpus.docs, 0.7)
    text = "".join(json.dumps(pile_record(d)) + "\n" for d in corpus.docs)
    download = make_download(work / "dl", {"train/00.jsonl.zst": text})
    print(f"pairing study: {len(corpus.docs)} documents, {len(pairs)} pairs >= 0.7 (exact)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for k, (label, settings) in enumerate(STUDY):
            out = work / f"out-{k}"
            run_dedup(download, out, unit_docs=300, partitions=4, **settings)
            near = json.loads((out / "report.json").read_text())["near"]
            kept = {int(r["doc_id"].rsplit(":", 1)[1]) - 1 for r in output_rows(out)}
            figures = rule_figures(len(corpus.docs), kept, pairs)
            print(
                f"  {label:>30}: {near['candidate_pairs']:6d} candidates, "
                f"{near['verified_pairs']:6d} verified; " + figures.line("").lstrip(": ")
            )
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--sizes", type=float, nargs=2, default=[4.0, 8.0])
    parser.add_argument("--clustering-mb", type=float, default=None)
    parser.add_argument(
        "--distinct",
        type=int,
        default=5000,
        help="unrelated documents per block of the chained corpus (5000: 10%% in groups)",
    )
    parser.add_argument("--study-window", action="store_true")
    args = parser.parse_args()
    if args.study_window:
        work = Path(tempfile.mkdtemp(prefix="dedup-study-"))
        try:
            window_study(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.clustering_mb:
        work = Path(tempfile.mkdtemp(prefix="dedup-clustering-"))
        try:
            clustering_runs(args.clustering_mb, args.distinct, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    texts = corpus(args.docs, 0)
    mb = sum(len(t) for t in texts) / 1e6
    base = datasketch_baseline(texts[: len(texts) // 4]) * 4
    print(
        f"signatures, {len(texts)} docs, {mb:.1f} MB, word {NGRAM}-grams, {NUM_PERM} slots, 1 core"
    )
    print(f"  datasketch MinHash.update_batch: {mb / base:8.2f} MB/s   1.0x")
    for scheme in ("one_permutation", "permutations"):
        seconds = min(ours(texts, scheme) for _ in range(2))
        print(f"  meshline {scheme:>16}: {mb / seconds:8.2f} MB/s {base / seconds:6.1f}x")

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    try:
        corpora = [stage_corpus(size) for size in args.sizes]
        results = [stage_run(records, ".jsonl.zst", work) for records in corpora]
        as_parquet = stage_run(corpora[-1], ".parquet", work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print("whole stage (2 CPUs, local Ray):")
    for size, seconds, largest, total in results:
        print(
            f"  {size:6.1f} MB: {size / seconds:6.2f} MB/s, peak RSS largest process "
            f"{largest / 2**20:7.0f} MiB, all processes {total / 2**20:7.0f} MiB"
        )
    (s1, _, l1, t1), (s2, _, l2, t2) = results
    print(f"  corpus x{s2 / s1:.2f}: largest process x{l2 / l1:.2f}, all processes x{t2 / t1:.2f}")
    zst_seconds, parquet_seconds = results[-1][1], as_parquet[1]
    print(
        f"  formats, {s2:.1f} MB: .jsonl.zst {s2 / zst_seconds:.2f} MB/s, "
        f".parquet {s2 / parquet_seconds:.2f} MB/s ({zst_seconds / parquet_seconds:.2f}x)"
    )


if __name__ == "__main__":
    main()
