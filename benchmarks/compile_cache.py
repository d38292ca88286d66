"""Time to the first training step with JAX's persistent compilation cache, cold and warm.

``python benchmarks/compile_cache.py [--configs demo,100m] [--repeats 2]``

Each measurement is one training host started as a fresh process
(``python -m stages.train.trainer``, what a restarted or resumed train stage runs), timed from
the process's start to its first step record: Python and JAX start-up, the data, building the
state, compiling (or loading) the programs and one step. "cold" starts with an empty cache
directory, "warm" with the directory the cold run filled; "off" runs without a cache, as
before the pipeline kept one. Two scenarios: "fresh", a run's first start (the state
initialised), and "resumed", a restart after a preemption (the state restored from a
checkpoint an earlier host saved). The goal: warm at most a third of cold on the demo config.
A second row per scenario starts the clock when the host's imports are done (Python, JAX's
own ~1.8 s import, Orbax), which no cache can shorten.

Configs: ``demo`` is ``configs/demo.yaml``'s train stage as it is (gptj-tiny, vocabulary
4096, bfloat16, 8 rows of 512 tokens, one device); ``100m`` is that stage with
``benchmarks/model.py``'s 100m shape (GPT-J at GPT-2 small width, vocabulary 50400) and 2
rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEQ_LEN = 512
HUNDRED_M = dict(vocab_size=50400, d_model=768, n_layers=12, n_heads=12, d_ff=3072, rotary_dim=64)


def demo_train() -> dict:
    """``configs/demo.yaml``'s train stage."""
    with open(os.path.join(ROOT, "configs", "demo.yaml")) as f:
        return yaml.safe_load(f)["stages"]["train"]


DEMO = demo_train()
CONFIGS = {"demo": DEMO, "100m": {**DEMO, "model_overrides": HUNDRED_M, "global_batch": 2}}


def synthetic_tokenized(out: str, seq: int, rows: int, vocab: int) -> str:
    """A tokenize output (the stage's manifest and Arrow shards) of random rows."""
    from stages.tokenize.packing import RowWriter

    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", rows), ("val", 8)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        path = f"{split}/shard-00000.arrow"
        with open(os.path.join(out, path), "wb") as f:
            writer = RowWriter(f, seq + 1, np.dtype(np.uint16))
            writer.add(rng.integers(0, vocab, count * (seq + 1), dtype=np.uint16))
            writer.close()
        shard = {"path": path, "rows": count, "first_row": 0, "source": "synthetic"}
        splits[split] = {"rows": count, "shards": [shard], "components": {}}
    manifest = {
        "format": "meshline.tokens.v1",
        "seq_len": seq,
        "row_len": seq + 1,
        "dtype": "uint16",
        "eos_id": vocab - 1,
        "tokenizer": {"kind": "synthetic", "fingerprint": "synthetic", "vocab_size": vocab},
        "splits": splits,
        "mixture": None,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


def train_config(name: str, cache: str | None, steps: int) -> str:
    """``name``'s train stage run to ``steps`` with ``cache`` as its compilation cache and a
    checkpoint at the end only. Every step is recorded and only the last validates, so a
    run that does two steps or more records its first step alone."""
    return json.dumps(
        {
            **CONFIGS[name],
            "steps": steps,
            "log_every": 1,
            "checkpoint_every": 1000,
            "val_every": 1000,
            "val_batches": 1,
            "peak_flops_per_device": 1e11,
            "compilation_cache": cache,
        }
    )


HOST = (
    "import sys\n"
    "import stages.train.trainer as trainer\n"
    "print('IMPORTED', flush=True)\n"
    "trainer.main(sys.argv[1:])\n"
)
"""A training host (``python -m stages.train.trainer``) that says when its imports are done."""


def first_step_seconds(config: str, tokenized: str, output: str) -> tuple[float, float]:
    """Seconds from starting a training host to its first step record, and of those the
    seconds after its imports (the data, the state, compiling or loading, one step)."""
    started = time.perf_counter()
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, config, tokenized, output],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert host.stdout is not None
    imported = started
    for line in host.stdout:
        if line.startswith("IMPORTED"):
            imported = time.perf_counter()
        if '"step"' in line:
            seconds = time.perf_counter() - started
            break
    else:
        raise RuntimeError(f"the host ended without a step (exit {host.wait()})")
    host.wait()
    return seconds, started + seconds - imported


def measure(name: str, work: str, repeats: int) -> dict[str, list[float]]:
    """Cold, warm and cache-off times of ``name`` in both scenarios, ``repeats`` rounds each,
    keyed ``"{scenario} {kind}"`` (and ``"... after imports"``)."""
    vocab = int(CONFIGS[name]["model_overrides"]["vocab_size"])
    tokenized = synthetic_tokenized(os.path.join(work, f"tok-{name}"), SEQ_LEN, 64, vocab)
    preempted = os.path.join(work, f"preempted-{name}")
    first_step_seconds(train_config(name, None, 1), tokenized, preempted)
    times: dict[str, list[float]] = {}
    for round_ in range(repeats):
        for scenario in ("fresh", "resumed"):
            cache = os.path.join(work, f"cache-{name}-{round_}-{scenario}")
            for kind, directory in (("off", None), ("cold", cache), ("warm", cache)):
                output = os.path.join(work, f"out-{name}-{round_}-{scenario}-{kind}")
                if scenario == "resumed":
                    shutil.copytree(preempted, output)
                config = train_config(name, directory, 2 if scenario == "fresh" else 3)
                total, after_imports = first_step_seconds(config, tokenized, output)
                key = f"{scenario} {kind}"
                times.setdefault(key, []).append(total)
                times.setdefault(f"{key} after imports", []).append(after_imports)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="demo,100m", help="comma-separated: demo, 100m")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of off, cold, warm")
    args = parser.parse_args(argv)
    print(f"time to first training step, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(
        f"{'config':<8}{'scenario':<10}{'from':<16}"
        f"{'off s':>9}{'cold s':>9}{'warm s':>9}{'warm/cold':>11}"
    )
    with tempfile.TemporaryDirectory() as work:
        for name in args.configs.split(","):
            times = measure(name, work, args.repeats)
            for scenario in ("fresh", "resumed"):
                for start, suffix in (("process start", ""), ("imports done", " after imports")):
                    off, cold, warm = (
                        statistics.median(times[f"{scenario} {kind}{suffix}"])
                        for kind in ("off", "cold", "warm")
                    )
                    print(
                        f"{name:<8}{scenario:<10}{start:<16}"
                        f"{off:>9.1f}{cold:>9.1f}{warm:>9.1f}{warm / cold:>11.2f}"
                    )
            each = {kind: [round(t, 1) for t in runs] for kind, runs in times.items()}
            print(f"{'':<8}each run: {json.dumps(each)}")


if __name__ == "__main__":
    main()
