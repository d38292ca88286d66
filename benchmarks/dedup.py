"""Dedup benchmark: MinHash signature throughput per core against datasketch, and the whole
stage's MB/s and peak memory at two corpus sizes, measured in one run.

    pip install datasketch   # the baseline; not a meshline dependency
    python benchmarks/dedup.py [--docs 2000] [--sizes 4 8]

Signatures: the same documents, word 5-grams (lowercased), 256 slots, one core; datasketch
gets its fastest path (``MinHash.update_batch`` over the encoded shingles). The stage runs
on a local 2-CPU Ray cluster over generated Pile files of the given sizes (MB of text);
peak RSS is sampled every 0.1 s over this process and every Ray process it started: the
largest single process (a worker) and the largest sum.
"""

from __future__ import annotations

import argparse
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
from tests.dedup_corpus import edited, make_download, pile_line, random_text, run_dedup  # noqa: E402

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


def stage_run(mb: float, work: Path) -> tuple[float, float, int, int]:
    rng = random.Random(int(mb * 10))
    lines, size, shard = [], 0, []
    while size < mb * 1e6:
        text = random_text(rng, rng.randint(100, 1500))
        if rng.random() < 0.1:
            text = edited(rng, text, 0.02)
        lines.append(pile_line(text))
        size += len(text)
    for k in range(4):
        shard.append("".join(lines[k::4]))
    files = {f"train/{k:02d}.jsonl.zst": s for k, s in enumerate(shard)}
    files["val.jsonl.zst"] = "".join(lines[:20])
    download = make_download(work / f"dl-{mb}", files)
    with PeakRss() as rss:
        started = time.perf_counter()
        run_dedup(download, work / f"out-{mb}", unit_docs=5000, partitions=8, max_workers=2)
        seconds = time.perf_counter() - started
    return size / 1e6, seconds, rss.largest, rss.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--sizes", type=float, nargs=2, default=[4.0, 8.0])
    args = parser.parse_args()
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
        results = [stage_run(size, work) for size in args.sizes]
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


if __name__ == "__main__":
    main()
