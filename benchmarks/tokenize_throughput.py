"""Tokenize throughput and memory against the raw encoders, measured in one run on one text.

``python benchmarks/tokenize_throughput.py [--mb 40] [--workers 1 2] [--repeats 3]`` builds a
dedup-style Parquet input (zstd parts of real text: this Python's standard library sources)
and prints:

- raw tiktoken ``encode_ordinary_batch`` (GPT-2 ranks, one thread) tokens/s on one core,
  and ``encode_to_numpy`` per document (what the stage's encoder calls);
- raw Hugging Face ``tokenizers`` ``encode_batch_fast`` tokens/s on one core
  (``TOKENIZERS_PARALLELISM=false``) and with its own thread pool;
- the tokenize stage end to end (read zstd Parquet, encode, pack, write Arrow IPC, commit)
  with 1 and 2 Ray Data workers: tokens/s, tokens/s per worker and its ratio to raw
  tiktoken per core, the seconds until the first encoded batch arrived (actor pool start),
  the actors' own encode rate (text to EOS-joined ids, per busy core), the 1 -> 2 worker
  speed-up, and peak RSS of the driver (this process, which packs and writes) and a worker;
- a 50 MB document encoded whole (tiktoken) and in chunks (the stage's encoder), each in
  a fresh process: peak RSS of both and whether the ids are identical.

Each raw encoder runs in a fresh process. Raw tiktoken ``encode_ordinary_batch`` and the
stage runs are repeated in ``--repeats`` rounds, one after the other, and reported as
medians: on a shared machine one run of each moves by a third from run to run. The stage
runs on a tokenizer already committed, as a restarted stage would, so its time is the
per-token work plus Ray Data's start-up of the actor pool. Goals (issue 4): end to end
>= 0.8x raw tiktoken per core; >= 1.7x from 1 to 2 workers.

(Not ``benchmarks/tokenize.py``: a script directory is first on ``sys.path``, and a
``tokenize.py`` there replaces the standard library's ``tokenize`` for every script in it.)
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.tokenize.bpe import load_gpt2
from stages.tokenize.stage import TOKENIZER_DIR, TOKENIZER_UNIT, TokenizeConfig, run
from stages.tokenize.tokenizer import EOS, GPT2_EOS_ID, GPT2_PATTERN

PARTS = 8
T = TypeVar("T")
LONG_DOCUMENT_MB = 50


def ranks_path() -> str:
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps openai-whisper (GPT-2 ranks in whisper/assets)")
    return os.path.join(spec.submodule_search_locations[0], "assets", "gpt2.tiktoken")


def corpus(megabytes: float) -> list[str]:
    """Standard library sources in name order until ``megabytes`` of UTF-8 text."""
    stdlib = sysconfig.get_paths()["stdlib"]
    texts, size = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    return texts


def write_dedup(root: str, texts: list[str]) -> None:
    for split, share in (("train", texts), ("val", texts[:20])):
        per_part = -(-len(share) // (PARTS if split == "train" else 1))
        for index, start in enumerate(range(0, len(share), per_part)):
            chunk = share[start : start + per_part]
            table = pa.table(
                {
                    "text": chunk,
                    "pile_set_name": ["Github"] * len(chunk),
                    "doc_id": [f"{split}:{start + i + 1}" for i in range(len(chunk))],
                }
            )
            os.makedirs(os.path.join(root, split), exist_ok=True)
            path = os.path.join(root, split, f"part-{index:05d}.parquet")
            pq.write_table(table, path, compression="zstd", row_group_size=256)


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding from the ranks file, as tiktoken_ext builds it."""
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(ranks_path()),
        special_tokens={EOS: GPT2_EOS_ID},
        explicit_n_vocab=GPT2_EOS_ID + 1,
    )


def raw_tiktoken(texts: list[str]) -> tuple[float, int]:
    encoding = gpt2_encoding()
    started = time.perf_counter()
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts, num_threads=1))
    return tokens / (time.perf_counter() - started), tokens


def raw_tiktoken_numpy(texts: list[str]) -> float:
    """What the stage's encoder calls: ``encode_to_numpy`` per document, one thread."""
    encoding = gpt2_encoding()
    started = time.perf_counter()
    tokens = sum(len(encoding.encode_to_numpy(t, disallowed_special=())) for t in texts)
    return tokens / (time.perf_counter() - started)


def raw_hf(texts: list[str], parallel: bool) -> float:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    hf = load_gpt2(ranks_path())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(hf.files["tokenizer.json"].decode())
    started = time.perf_counter()
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts))
    return tokens / (time.perf_counter() - started)


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last ``reset_peak_rss`` (VmHWM)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def stage_run(dedup: str, output: str, workers: int) -> dict[str, float]:
    config = TokenizeConfig(
        tokenizer={"kind": "gpt2", "source": ranks_path()},
        splits=["train", "val"],
        workers_min=workers,
        workers_max=workers,
    )
    ctx = StageContext(
        name="tokenize",
        config=config,
        output=output,
        inputs={"dedup": Upstream("dedup", dedup, "bench", "bench")},
        ledger=Ledger(output),
    )
    tokenizer = load_gpt2(ranks_path())
    with ctx.ledger.unit(TOKENIZER_UNIT) as unit:
        for name, data in tokenizer.files.items():
            with unit.open(f"{TOKENIZER_DIR}/{name}") as f:
                f.write(data)
    reset_peak_rss()
    started = time.perf_counter()
    run(ctx)
    seconds = time.perf_counter() - started
    return {
        **ctx.metrics,
        "wall": seconds,
        "digest": Ledger(output).digest(),
        "driver_peak_rss_mb": peak_rss_mb(),
    }


_LONG_DOCUMENT = """
import hashlib, json, sys
import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
sys.path.insert(0, {root!r})
from stages.tokenize.bpe import load_gpt2
from stages.tokenize.tokenizer import EOS, GPT2_EOS_ID, GPT2_PATTERN
tokenizer = load_gpt2({ranks!r})
encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(
    {ranks!r}), special_tokens={{EOS: GPT2_EOS_ID}}, explicit_n_vocab=GPT2_EOS_ID + 1)
unit = open({text!r}, encoding="utf-8").read()
text = unit * ({megabytes} * 10**6 // len(unit.encode("utf-8")) + 1)
def peak_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
before = peak_mb()
if {whole}:
    ids = np.array(encoding.encode_ordinary(text), dtype=np.uint16)
else:
    ids = tokenizer.encode_array(text)
print(json.dumps({{"mb": len(text.encode()) / 1e6, "tokens": len(ids),
    "sha256": hashlib.sha256(ids.tobytes()).hexdigest(), "rss_before_mb": before,
    "rss_peak_mb": peak_mb()}}))
"""


def long_document(workdir: str, texts: list[str], whole: bool) -> dict:
    sample = os.path.join(workdir, "long-unit.txt")
    with open(sample, "w", encoding="utf-8") as f:
        f.write("\n".join(texts[:200]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _LONG_DOCUMENT.format(
        root=root, ranks=ranks_path(), text=sample, megabytes=LONG_DOCUMENT_MB, whole=whole
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=40.0, help="text to tokenize, 10^6 bytes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (medians reported)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    import ray

    workdir = tempfile.mkdtemp(prefix="bench-tokenize-")
    try:
        texts = corpus(args.mb)
        size = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        dedup = os.path.join(workdir, "dedup")
        write_dedup(dedup, texts)
        print(f"text: {len(texts)} documents, {size:.1f} MB (stdlib sources), {PARTS} train parts")
        # The raw encoders run in a fresh process each, so that what they allocate (HF's
        # Encoding objects) does not inflate this process's memory, which is the stage's.
        numpy_rate = in_fresh_process(raw_tiktoken_numpy, texts)
        hf_one = in_fresh_process(raw_hf, texts, False)
        hf_all = in_fresh_process(raw_hf, texts, True)
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False)
        # Rounds of raw tiktoken and each stage run one after the other, so that a
        # colleague's load hits them alike; the figures are medians over the rounds.
        raw_rates, runs = [], {workers: [] for workers in args.workers}
        for round_index in range(args.repeats):
            rate, tokens = in_fresh_process(raw_tiktoken, texts)
            raw_rates.append(rate)
            for workers in args.workers:
                output = os.path.join(workdir, f"tokenize-{workers}-{round_index}")
                runs[workers].append(stage_run(dedup, output, workers))
                shutil.rmtree(output)  # its digest is all the comparison needs
        tiktoken_rate = statistics.median(raw_rates)
        print(f"train tokens (GPT-2): {tokens}; medians of {args.repeats} rounds")
        print(f"raw tiktoken encode_ordinary_batch, 1 core: {tiktoken_rate / 1e6:7.3f} M tokens/s")
        print(
            f"raw tiktoken encode_to_numpy per document, 1 core: {numpy_rate / 1e6:7.3f} M tokens/s"
        )
        print(f"raw HF tokenizers encode_batch_fast, 1 core: {hf_one / 1e6:7.3f} M tokens/s")
        print(f"raw HF tokenizers encode_batch_fast, all cores: {hf_all / 1e6:7.3f} M tokens/s")
        results = {}
        for workers, rounds in runs.items():
            results[workers] = r = {
                key: statistics.median(run[key] for run in rounds)
                for key in (
                    "wall",
                    "startup_seconds",
                    "encode_seconds",
                    "tokens_encoded",
                    "workers",
                    "worker_peak_rss_mb",
                    "driver_peak_rss_mb",
                )
            }
            r["digests"] = {run["digest"] for run in rounds}
            rate = r["tokens_encoded"] / r["wall"]
            print(
                f"stage end to end, {workers} worker(s): {rate / 1e6:7.3f} M tokens/s, "
                f"{rate / workers / 1e6:.3f} per worker = "
                f"{rate / workers / tiktoken_rate:.2f}x raw tiktoken per core "
                f"({r['wall']:.1f} s, {r['startup_seconds']:.1f} s of it until the first "
                "encoded batch arrived; runs "
                + ", ".join(f"{run['wall']:.1f}" for run in rounds)
                + " s)"
            )
            in_actor = r["tokens_encoded"] / r["encode_seconds"]
            print(
                f"  inside the actors: encode {in_actor / 1e6:.3f} M tokens/s per busy core; "
                f"workers used {r['workers']:.0f}; peak RSS: "
                f"worker {r['worker_peak_rss_mb']:.0f} MB, driver {r['driver_peak_rss_mb']:.0f} MB"
            )
        if len(results) > 1:
            low, high = min(results), max(results)
            speedup = results[low]["wall"] / results[high]["wall"]
            same = len(results[low]["digests"] | results[high]["digests"]) == 1
            print(f"speed-up {low} -> {high} workers: {speedup:.2f}x; identical output: {same}")
        print(f"machine CPUs: {os.cpu_count()} (shared with other users' processes)")
        whole = long_document(workdir, texts, whole=True)
        chunked = long_document(workdir, texts, whole=False)
        print(
            f"{whole['mb']:.0f} MB document, peak RSS of a fresh process: whole "
            f"(tiktoken encode_ordinary) {whole['rss_peak_mb']:.0f} MB, chunked (the stage's "
            f"encoder) {chunked['rss_peak_mb']:.0f} MB, both from "
            f"{chunked['rss_before_mb']:.0f} MB with the text loaded; {chunked['tokens']} ids, "
            "identical: "
            f"{whole['sha256'] == chunked['sha256']}"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
