"""The evaluate stage on a small trained model: the demo's offline tasks and bits per byte
score better after training than before (the initial model rebuilt from the train stage's
seed, exactly what the trainer started from), results.json follows lm-eval's layout, a
restarted stage redoes only unfinished tasks, and bad inputs are named without losing the
other tasks' results."""

from __future__ import annotations

import json
import os
import random
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream, fingerprint
from stages.convert import ConvertError
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.models import initial_params
from stages.evaluate.report import improvements, table
from stages.evaluate.stage import EvaluateError, run
from stages.tokenize.bpe import train_bpe
from stages.tokenize.packing import RowWriter, with_eos
from stages.train.config import TrainConfig
from stages.train.trainer import Trainer

SEQ_LEN = 128
TRAIN = dict(
    model="gptj-tiny",
    model_overrides={"vocab_size": 512, "d_model": 64, "n_layers": 2, "d_ff": 256, "max_len": 128},
    dtype="float32",
    global_batch=16,
    micro_batches=1,
    steps=120,
    checkpoint_every=60,
    val_every=120,
    val_batches=1,
    optimizer={"warmup_steps": 10, "anneal_steps": 110, "lr": 4e-3, "end_lr": 4e-4},
    peak_flops_per_device=1e11,
)
DEMO = {
    "tasks": [],
    "demo_tasks": {"lambada": 60, "choice": 60, "max_context_chars": 300},
    "bits_per_byte": {"max_bytes_per_component": 12_000},
    "compare_initial": True,
    "samples": {"prompts": ["def ", "What is 3 plus 4?\n"], "max_new_tokens": 8},
}
STDLIB_FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py")


def code_documents() -> list[str]:
    """ "Github": a few standard-library modules cut into function-sized documents."""
    docs = []
    for name in STDLIB_FILES:
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name)) as f:
            text = f.read()
        docs.extend(part for part in text.split("\n\n\n") if len(part) > 200)
    return docs


def math_documents(count: int) -> list[str]:
    """ "DM Mathematics": each document twelve questions of one kind, then their answers."""
    rng = random.Random(0)
    kinds = [
        lambda a, b: (f"What is {a} plus {b}?", a + b),
        lambda a, b: (f"Subtract {b} from {a}.", a - b),
        lambda a, b: (f"Solve {a}*x = {a * b} for x.", b),
    ]
    docs = []
    for i in range(count):
        pairs = [kinds[i % 3](rng.randint(1, 30), rng.randint(1, 30)) for _ in range(12)]
        docs.append("".join(f"{q}\n{a}\n" for q, a in pairs))
    return docs


def write_tokenized(out: Path, tokenizer: Any, splits: dict[str, list[str]]) -> None:
    """A tokenize output (the stage's contract, one shard per split) and its tokenizer."""
    tokenizer.save(str(out / "tokenizer"))
    row_len, dtype = SEQ_LEN + 1, tokenizer.dtype
    manifest_splits = {}
    for split, texts in splits.items():
        os.makedirs(out / split)
        path = f"{split}/shard-00000.arrow"
        with open(out / path, "wb") as f:
            writer = RowWriter(f, row_len, dtype)
            writer.add(with_eos(tokenizer.encode_documents(texts), tokenizer.eos_id, dtype))
            writer.close()
        shards = [{"path": path, "rows": writer.rows, "first_row": 0, "source": path}]
        manifest_splits[split] = {"rows": writer.rows, "shards": shards, "components": {}}
    manifest = {
        "format": "meshline.tokens.v1",
        "seq_len": SEQ_LEN,
        "row_len": row_len,
        "dtype": str(np.dtype(dtype)),
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"kind": "train", "fingerprint": "test", "vocab_size": tokenizer.vocab_size},
        "splits": manifest_splits,
        "mixture": None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def write_heldout(out: Path, docs: list[tuple[str, str]]) -> None:
    """A dedup output's val split: one Parquet part with text, pile_set_name, doc_id."""
    os.makedirs(out / "val")
    table = pa.table(
        {
            "text": [text for text, _ in docs],
            "pile_set_name": [component for _, component in docs],
            "doc_id": [f"val.jsonl.zst:{i}" for i in range(1, len(docs) + 1)],
        }
    )
    pq.write_table(table, out / "val" / "part-00000.parquet", compression="zstd")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Dedup, tokenize and train outputs of a small model trained on code and arithmetic."""
    root = tmp_path_factory.mktemp("evaluate")
    labelled = [(t, "Github") for t in code_documents()] + [
        (t, "DM Mathematics") for t in math_documents(150)
    ]
    val = labelled[::8]
    train = [doc for i, doc in enumerate(labelled) if i % 8]
    tokenizer = train_bpe([t for t, _ in train], vocab_size=512, whitespace_tokens=8)
    splits = {"train": [t for t, _ in train], "val": [t for t, _ in val]}
    write_tokenized(root / "tokenize", tokenizer, splits)
    write_heldout(root / "dedup", val)
    config = TrainConfig.model_validate(TRAIN)
    trainer = Trainer(config, str(root / "tokenize"), str(root / "train"))
    trainer.train()
    (root / "train" / "model_config.json").write_text(trainer.model.model_dump_json())
    resolved = {
        "stage": "train",
        "fingerprint": "test",
        "config": config.model_dump(mode="json"),
        "inputs": [{"stage": "tokenize", "uri": str(root / "tokenize")}],
    }
    os.makedirs(root / "train" / "_meta")
    (root / "train" / "_meta" / "config.json").write_text(json.dumps(resolved))
    return {name: str(root / name) for name in ("dedup", "tokenize", "train")}


class Logged:
    """What the stage sent to MLflow: metrics and the artifacts' contents."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: dict[str, str] = {}

    def artifact(self, local_path: str, artifact_dir: str) -> None:
        with open(local_path) as f:
            self.artifacts[f"{artifact_dir}/{os.path.basename(local_path)}"] = f.read()


def context(out: Path, upstream: dict[str, str], config: dict, logged: Logged) -> StageContext:
    configs = {"train": TrainConfig.model_validate(TRAIN).model_dump(mode="json")}
    inputs = {
        name: Upstream(name, uri, "fp", "digest", config=configs.get(name, {}))
        for name, uri in upstream.items()
    }
    return StageContext(
        name="evaluate",
        config=EvaluateConfig.model_validate(config),
        output=str(out),
        inputs=inputs,
        ledger=Ledger(str(out)),
        metric_sink=logged.metrics.update,
        log_artifact=logged.artifact,
    )


def test_demo_tasks_score_better_after_training(upstream: dict[str, str], tmp_path: Path) -> None:
    logged = Logged()
    out = tmp_path / "evaluate"
    ctx = context(out, upstream, DEMO, logged)
    run(ctx)
    results = json.loads((out / "results.json").read_text())
    initial = json.loads((out / "results-initial.json").read_text())
    assert set(results["results"]) == {
        "demo_lambada",
        "demo_hellaswag",
        "pile_github",
        "pile_dm-mathematics",
        "pile",
    }
    lambada = results["results"]["demo_lambada"]
    assert set(lambada) == {
        "alias",
        "acc,none",
        "acc_stderr,none",
        "perplexity,none",
        "perplexity_stderr,none",
    }
    assert results["n-shot"]["demo_hellaswag"] == 0 and results["versions"]["pile"] == 1.0
    assert results["n-samples"]["demo_lambada"] == {"original": 60, "effective": 60}
    assert results["higher_is_better"]["pile"]["bits_per_byte"] is False
    assert results["configs"]["demo_lambada"]["dataset_path"] == "demo_tasks/lambada.jsonl"

    task_scores = {k: v for k, v in ctx.metrics.items() if "." in k}
    final_scores = {k: v for k, v in task_scores.items() if not k.startswith("initial.")}
    initial_scores = {
        k.removeprefix("initial."): v for k, v in task_scores.items() if k.startswith("initial.")
    }
    assert initial_scores["demo_lambada.acc"] == initial["results"]["demo_lambada"]["acc,none"]
    better = improvements(final_scores, initial_scores)
    assert len(better) == 2 + 2 + 3 * 3, better
    assert all(better.values()), table(final_scores, initial_scores)
    assert ctx.metrics["scores_improved"] == len(better) == logged.metrics["scores_compared"]

    assert logged.artifacts["results/results.json"] == (out / "results.json").read_text()
    assert logged.artifacts["results/table.txt"] == (out / "table.txt").read_text()
    assert (out / "table.txt").read_text() == table(final_scores, initial_scores) + "\n"
    markdown = (out / "table.md").read_text().splitlines()
    assert markdown[0].startswith("| task | metric | ours | initial | GPT-J-6B |")
    assert "| demo_lambada | acc |" in "\n".join(markdown)
    assert len(markdown) == len(table(final_scores, initial_scores).splitlines())
    samples = logged.artifacts["samples/samples.txt"]
    assert "prompt: 'def '" in samples and "nucleus (top_p 0.9" in samples

    # A restart redoes only what is missing, and produces the same bytes.
    before = {r["name"]: r for r in ctx.ledger.records()}
    (out / "_meta" / "units" / "task__demo_hellaswag.json").unlink()
    (out / "tasks" / "demo_hellaswag.json").unlink()
    again = context(out, upstream, DEMO, Logged())
    run(again)
    after = {r["name"]: r for r in again.ledger.records()}
    assert (out / "results.json").read_text() == logged.artifacts["results/results.json"]
    assert after["task/demo_hellaswag"]["files"] == before["task/demo_hellaswag"]["files"]
    for name in ("task/demo_lambada", "initial/task/demo_hellaswag", "demo-tasks", "samples"):
        assert after[name]["committed_at"] == before[name]["committed_at"]
    assert again.metrics == ctx.metrics


def test_initial_model_is_what_the_trainer_starts_from(
    upstream: dict[str, str], tmp_path: Path
) -> None:
    config = TrainConfig.model_validate(TRAIN)
    _, ours = initial_params(upstream["train"], config)
    started = Trainer(config, upstream["tokenize"], str(tmp_path / "t")).initial_state()["params"]
    pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(started), strict=True)
    assert jax.tree.structure(ours) == jax.tree.structure(started)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_failed_tasks_are_named_and_the_others_kept(
    upstream: dict[str, str], tmp_path: Path
) -> None:
    piqa = [
        {"goal": "Add 3 and 4.", "sol1": "7", "sol2": "def f(x):", "label": 0},
        {"goal": "What is 2 plus 2?", "sol1": "return None", "sol2": "4", "label": 1},
    ]
    good = write_jsonl(tmp_path / "piqa.jsonl", piqa)
    missing = write_jsonl(tmp_path / "wino.jsonl", [{"sentence": "_ is.", "option1": "a"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    config = {
        "tasks": [
            {"name": "winogrande", "source": missing},
            {"name": "piqa", "source": good},
            {"name": "piqa", "source": empty, "alias": "piqa_empty"},
        ],
        "bits_per_byte": None,
        "samples": None,
    }
    logged = Logged()
    out = tmp_path / "evaluate"
    ctx = context(out, upstream, config, logged)
    with pytest.raises(EvaluateError) as error:
        run(ctx)
    message = str(error.value)
    assert "2 task(s) failed" in message
    assert f"winogrande ({missing})" in message and "option2" in message
    assert f"piqa_empty ({empty})" in message
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == ["piqa"]
    assert logged.metrics["piqa.acc"] == results["results"]["piqa"]["acc,none"]
    assert ctx.ledger.is_committed("task/piqa") and not ctx.ledger.is_committed("task/winogrande")


def test_checkpoint_of_the_wrong_shape_is_named(upstream: dict[str, str], tmp_path: Path) -> None:
    train = tmp_path / "train"
    shutil.copytree(upstream["train"], train)
    model = json.loads((train / "model_config.json").read_text())
    (train / "model_config.json").write_text(json.dumps({**model, "d_ff": 128}))
    out = tmp_path / "evaluate"
    config = {"tasks": [], "bits_per_byte": {"max_bytes_per_component": 1000}, "samples": None}
    ctx = context(out, {**upstream, "train": str(train)}, config, Logged())
    with pytest.raises(ConvertError, match=rf"checkpoint {train}/checkpoints/120: tensor .*fc_in"):
        run(ctx)
    assert ctx.ledger.records() == []


def test_config_validates_tasks_and_keeps_batch_size_out_of_the_fingerprint() -> None:
    with pytest.raises(ValueError, match="lambada_openai"):
        EvaluateConfig.model_validate({"tasks": [{"name": "lambada"}]})
    small, large = EvaluateConfig(batch_size=4), EvaluateConfig(batch_size=64)
    assert fingerprint(small, ["x"]) == fingerprint(large, ["x"])
    assert fingerprint(small, ["x"]) != fingerprint(EvaluateConfig(step=10), ["x"])
    assert [t.name for t in EvaluateConfig().tasks] == [
        "lambada_openai",
        "hellaswag",
        "piqa",
        "winogrande",
    ]


def test_table_sets_published_numbers_beside_ours() -> None:
    shown = table(
        {"lambada_openai.acc": 0.5, "lambada_openai.acc_stderr": 0.01, "pile.bits_per_byte": 1.0},
        {"lambada_openai.acc": 0.0, "pile.bits_per_byte": 3.0},
    ).splitlines()
    assert shown[0].split() == ["task", "metric", "ours", "initial", "GPT-J-6B", "GPT-3", "Curie"]
    assert shown[2].split() == ["lambada_openai", "acc", "0.5", "0", "0.697", "0.693"]
    assert shown[3].split() == ["pile", "bits_per_byte", "1", "3"]
    assert len(shown) == 4
