"""Our evaluator against lm-evaluation-harness's HF backend: documents per second, same model,
same requests, same machine, one run.

``python benchmarks/evaluate.py [--docs 100] [--d-model 256] [--layers 8] [--batch-size 32]``
builds a GPT-J-style model with GPT-2's tokenizer (random weights: the speed of scoring does
not depend on them; ~34M parameters at the defaults, most in the embedding and lm_head),
exports it with ``export_hf`` and writes two local task files made from standard-library
text: a LAMBADA-format one (``{"text": passage}`` of 40-80 words) and a HellaSwag-format one
(a context of 30-60 words and four 10-30-word endings).

Both sides score exactly the same loglikelihood requests (``tasks.TASKS[...].question``,
which the parity tests hold equal to lm-eval's):

- ours: ``evaluate_task`` with ``JaxLM.from_hf_dir`` (tokenising, batching, scoring and
  metrics), first cold (jit compiles included), then warm;
- lm-eval: ``HFLM(pretrained=EXPORT, dtype=float32, device=cpu, batch_size=B)`` and its
  ``loglikelihood`` on the same ``Instance``s (scoring only: it gets no metric work).

Documents/s and the process's CPU seconds (all threads) are printed per task; on a shared
machine CPU seconds compare the work of the two more steadily than wall time. The goal
(issue 8) is ours >= 2x lm-eval's documents/s.

``--harness`` times what a user of lm-eval sees instead: ``lm_eval.simple_evaluate`` with
``model="meshline"`` and with ``model="hf"`` on one small task set (a rolling-perplexity task
of 24 documents, 120 four-way multiple-choice questions, 60 ``generate_until`` prompts of at
most 32 new tokens, stopping at a newline), each a fresh process timed from its start to its
results (imports, model load, compiling and scoring): meshline with an empty compilation
cache (cold), then again with the cache it filled (warm), and hf. It prints the seconds and
whether each side's metrics equal hf's. The goal (issue 18): meshline cold no slower than
hf, with identical scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.convert import export_hf  # noqa: E402
from stages.evaluate.lm import JaxLM  # noqa: E402
from stages.evaluate.tasks import TASKS, evaluate_task  # noqa: E402
from stages.tokenize.bpe import load_gpt2  # noqa: E402
from stages.train.model import init_params  # noqa: E402
from stages.train.model_config import gptj, param_count  # noqa: E402
from tests.tokenize_data import gpt2_ranks_path, stdlib_texts  # noqa: E402


def word_pool() -> list[str]:
    """Words of the standard library's source, in order (realistic token statistics)."""
    return re.findall(r"[A-Za-z][A-Za-z']+|[.,;:()]", " ".join(stdlib_texts(60)))


def passage(rng: random.Random, pool: list[str], low: int, high: int) -> str:
    start = rng.randrange(len(pool) - high)
    return " ".join(pool[start : start + rng.randint(low, high)])


def lambada_docs(rng: random.Random, pool: list[str], count: int) -> list[dict]:
    return [{"text": passage(rng, pool, 40, 80)} for _ in range(count)]


def hellaswag_docs(rng: random.Random, pool: list[str], count: int) -> list[dict]:
    return [
        {
            "activity_label": passage(rng, pool, 1, 2),
            "ctx_a": passage(rng, pool, 25, 50),
            "ctx_b": passage(rng, pool, 5, 10),
            "endings": [passage(rng, pool, 10, 30) for _ in range(4)],
            "label": str(rng.randrange(4)),
        }
        for _ in range(count)
    ]


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn's result, wall seconds and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def hf_scorer(export: str, batch_size: int) -> Callable[[list[tuple[str, str]]], list]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=export, dtype="float32", device="cpu", batch_size=batch_size)

    def score(requests: list[tuple[str, str]]) -> list:
        instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
        return hf.loglikelihood(instances, disable_tqdm=True)

    return score


HARNESS_TASKS = {"bench_rolling": 24, "bench_choice": 120, "bench_generate": 60}
"""Documents per task of ``--harness``'s small task set."""
SCORE_TOLERANCE = 1e-4
"""Relative tolerance for perplexity and bits per byte, as tests/test_evaluate_parity.py's."""


def harness_tasks(directory: Path, rng: random.Random, pool: list[str]) -> list[str]:
    """Task files (JSON, which YAML reads) and their documents in ``directory``."""
    docs = {
        "bench_rolling": [{"text": passage(rng, pool, 100, 300)} for _ in range(24)],
        "bench_choice": [
            {
                "ctx": passage(rng, pool, 20, 40),
                "endings": [passage(rng, pool, 5, 15) for _ in range(4)],
                "label": rng.randrange(4),
            }
            for _ in range(120)
        ],
        "bench_generate": [
            {"prompt": passage(rng, pool, 10, 30), "answer": passage(rng, pool, 1, 3)}
            for _ in range(60)
        ],
    }
    kinds = {
        "bench_rolling": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity"},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte"},
            ],
        },
        "bench_choice": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{ctx}}",
            "doc_to_choice": "{{endings}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}],
        },
        "bench_generate": {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for task, task_docs in docs.items():
        data = directory / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in task_docs))
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            **kinds[task],
        }
        (directory / f"{task}.yaml").write_text(json.dumps(config))
    return list(docs)


EVALUATE = """
import json, sys, time
import lm_eval
from lm_eval.tasks import TaskManager
import stages.evaluate.lm_eval_model
model, model_args, include, tasks = sys.argv[1:5]
out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks.split(","),
    task_manager=TaskManager(include_path=include))
print("RESULTS " + json.dumps(out["results"]))
"""


def harness_run(model: str, model_args: str, include: Path, tasks: list[str]) -> tuple:
    """One fresh ``simple_evaluate`` process: its wall seconds and results."""
    env = dict(os.environ, HF_DATASETS_CACHE=tempfile.mkdtemp(), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", EVALUATE, model, model_args, str(include), ",".join(tasks)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{model}: {done.stderr[-3000:]}")
    return seconds, json.loads(lines[-1][len("RESULTS ") :])


def harness(export: str, batch_size: int, tmp: str, pool: list[str]) -> None:
    """``--harness``: lm-eval's own runs of the small task set, meshline cold and warm, hf."""
    include = Path(tmp, "tasks")
    include.mkdir()
    tasks = harness_tasks(include, random.Random(1), pool)
    cache = os.path.join(tmp, "xla-cache")
    runs = {
        "meshline (cold)": ("meshline", f"checkpoint={export},compilation_cache={cache}"),
        "meshline (warm)": ("meshline", f"checkpoint={export},compilation_cache={cache}"),
        "hf": ("hf", f"pretrained={export},dtype=float32,device=cpu"),
    }
    done = {
        side: harness_run(model, f"{args},batch_size={batch_size}", include, tasks)
        for side, (model, args) in runs.items()
    }
    reference_seconds, reference = done["hf"]
    print(f"lm_eval.simple_evaluate on {HARNESS_TASKS} (documents per task), fresh processes:")
    for side, (seconds, results) in done.items():
        same = all(same_scores(results[t], reference[t]) for t in tasks)
        print(
            f"  {side:<16}{seconds:>7.1f} s  {seconds / reference_seconds:>5.2f}x hf's time  "
            f"scores {'equal' if same else 'DIFFER from'} hf's"
        )
        if not same:
            print(f"    ours {json.dumps({t: results[t] for t in tasks})}")
            print(f"    hf's {json.dumps({t: reference[t] for t in tasks})}")
    print(
        "  (equal as the parity tests hold them: accuracy and exact match identical, "
        f"perplexity and bits per byte within {SCORE_TOLERANCE:g} relative)"
    )


def same_scores(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether one task's metrics agree: counted metrics (acc, exact_match) exactly, the
    ones computed from summed log-probabilities within ``SCORE_TOLERANCE`` relative."""
    if ours.keys() != theirs.keys():
        return False
    for name, value in ours.items():
        other = theirs[name]
        counted = name.startswith(("acc", "exact_match"))
        if isinstance(value, float) and isinstance(other, float) and not counted:
            if not math.isclose(value, other, rel_tol=SCORE_TOLERANCE):
                return False
        elif name != "alias" and value != other:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100, help="documents per task")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--harness", action="store_true", help="lm-eval end to end, see above")
    args = parser.parse_args()

    tokenizer = load_gpt2(gpt2_ranks_path())
    config = gptj(
        vocab_size=50400,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.d_model // 64,
        d_ff=4 * args.d_model,
        rotary_dim=32,
        max_len=2048,
    )
    params = jax.tree.map(np.asarray, nn.unbox(init_params(config, jax.random.key(0))))
    rng = random.Random(0)
    pool = word_pool()
    docs = {
        "lambada_openai": lambada_docs(rng, pool, args.docs),
        "hellaswag": hellaswag_docs(rng, pool, args.docs),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(os.path.join(tmp, "tokenizer"))
        export = export_hf(
            params,
            config,
            os.path.join(tmp, "hf"),
            tokenizer_dir=os.path.join(tmp, "tokenizer"),
            eos_token_id=tokenizer.eos_id,
        )
        if args.harness:
            harness(export, args.batch_size, tmp, pool)
            return
        ours = JaxLM.from_hf_dir(export, batch_size=args.batch_size)
        theirs = hf_scorer(export, args.batch_size)
        print(
            f"model: {param_count(config) / 1e6:.1f}M params (d_model {args.d_model}, "
            f"{args.layers} layers, vocab 50400), batch size {args.batch_size}, "
            f"CPU, load average {os.getloadavg()[0]:.1f}"
        )
        header = f"{'task':<16}{'docs':>6}{'requests':>10}  {'side':<14}"
        print(f"{header}{'docs/s':>9}{'cpu s':>9}{'ours/lm-eval':>14}")
        for task, task_docs in docs.items():
            requests = [r for d in task_docs for r in TASKS[task].question(d).requests]
            runs = {
                "ours (cold)": timed(lambda t=task, d=task_docs: evaluate_task(ours, t, d)),
                "ours (warm)": timed(lambda t=task, d=task_docs: evaluate_task(ours, t, d)),
                "lm-eval hf": timed(lambda r=requests: theirs(r)),
            }
            reference = len(task_docs) / runs["lm-eval hf"][1]
            for side, (_, wall, cpu) in runs.items():
                rate = len(task_docs) / wall
                print(
                    f"{task:<16}{len(task_docs):>6}{len(requests):>10}  {side:<14}"
                    f"{rate:>9.1f}{cpu:>9.1f}{rate / reference:>13.2f}x"
                )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
