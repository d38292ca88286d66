"""Parity with lm-evaluation-harness itself: a tiny GPT-J with a trained BPE, exported with
``export_hf``, is scored by lm-eval's HF backend (``simple_evaluate`` over local task YAMLs
that include the real tasks' YAMLs) and by our evaluator on the same files. Requests must
be identical, loglikelihoods within 1e-4, acc/acc_norm identical, perplexity, bits per byte
and stderrs within 1e-4 relative; the ``meshline`` lm-eval model must give our numbers.

The model's max_length is 64 tokens, so long contexts are truncated and Pile-style
documents span several rolling windows."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import lm_eval
import numpy as np
import pytest
from flax import linen as nn
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from stages.convert import export_hf
from stages.evaluate.lm import JaxLM
from stages.evaluate.lm_eval_model import MeshlineLM
from stages.evaluate.tasks import (
    TASKS,
    TaskResult,
    evaluate_bits_per_byte,
    evaluate_task,
    load_documents,
)
from stages.tokenize.bpe import train_bpe
from stages.tokenize.tokenizer import load_tokenizer
from stages.train.generate import generate
from stages.train.model import init_params
from stages.train.model_config import ModelConfig, gptj
from stages.train.output import write_checkpoint
from tests.tokenize_data import stdlib_texts

LL_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-4
DOCS = 10
MAX_LEN = 64
TASK_DIR = Path(lm_eval.__file__).parent / "tasks"
REAL_YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "sciq": "sciq/sciq.yaml",
}
SENTENCE_WORDS = (
    "the a man woman dog cat runs jumps quickly slowly over under house river tree red blue "
    "water fire stone book reads writes because then later never always small large old new "
    "bright dark sings eats sleeps walks table chair window door garden city road light"
)
WORDS = tuple(SENTENCE_WORDS.split())


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def lambada_doc(rng: random.Random) -> dict:
    return {"text": words(rng, 5, 60)}


def hellaswag_doc(rng: random.Random) -> dict:
    artefact = rng.choice(["", " [title] ", " [step] ", "  "])
    return {
        "activity_label": words(rng, 1, 2).title(),
        "ctx_a": words(rng, 4, 20) + artefact + words(rng, 1, 3) + ".",
        "ctx_b": words(rng, 1, 6),
        "endings": [words(rng, 1, 12) + rng.choice(["", " [header]", "."]) for _ in range(4)],
        "label": str(rng.randrange(4)),
    }


def piqa_doc(rng: random.Random) -> dict:
    sols = {"sol1": words(rng, 1, 10), "sol2": words(rng, 1, 10)}
    return {"goal": words(rng, 3, 12) + "?", **sols, "label": rng.randrange(2)}


def winogrande_doc(rng: random.Random) -> dict:
    sentence = f"{words(rng, 2, 10)} _ {words(rng, 1, 8)}."
    options = {"option1": rng.choice(WORDS), "option2": words(rng, 1, 2)}
    return {"sentence": sentence, **options, "answer": rng.choice(["1", "2"])}


def arc_doc(rng: random.Random) -> dict:
    count = rng.randint(3, 5)
    labels = rng.choice(["ABCDE", "12345"])[:count]
    choices = {"text": [words(rng, 1, 6) for _ in range(count)], "label": list(labels)}
    return {
        "question": words(rng, 4, 14) + "?",
        "choices": choices,
        "answerKey": rng.choice(labels),
    }


def sciq_doc(rng: random.Random) -> dict:
    support = rng.choice(["", " \n" + words(rng, 5, 50), words(rng, 30, 70)])
    answers = {f"distractor{i}": words(rng, 1, 3) for i in (1, 2, 3)}
    return {
        "support": support,
        "question": words(rng, 3, 10) + "?",
        **answers,
        "correct_answer": words(rng, 1, 3),
    }


MAKERS: dict[str, Callable[[random.Random], dict]] = {
    "lambada_openai": lambada_doc,
    "hellaswag": hellaswag_doc,
    "piqa": piqa_doc,
    "winogrande": winogrande_doc,
    "arc_easy": arc_doc,
    "arc_challenge": arc_doc,
    "sciq": sciq_doc,
}


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def local_yaml(task: str, data: Path) -> str:
    """The real task's YAML with its documents from a local JSON-lines file."""
    split = TASKS[task].split
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    config = {
        "include": str(TASK_DIR / REAL_YAML[task]),
        "task": f"local_{task}",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data)}},
        **splits,
        f"{split}_split": split,
    }
    return json.dumps(config)


PILE_YAML = {
    "task": "local_pile",
    "dataset_path": "json",
    "dataset_name": None,
    "dataset_kwargs": {"data_files": {"test": None}},
    "output_type": "loglikelihood_rolling",
    "test_split": "test",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [
        {"metric": "word_perplexity", "aggregation": "weighted_perplexity"},
        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity"},
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte"},
    ],
}


def random_params(config: ModelConfig) -> dict:
    """Every leaf random (norm scales around 1): logits spread enough that no choice ties."""
    shapes = nn.unbox(init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: rng.normal(
            1.0 if path[-1].key == "scale" else 0.0, 0.2, leaf.shape
        ).astype(np.float32),
        shapes,
    )


@pytest.fixture(scope="module", autouse=True)
def offline_lm_eval() -> Iterator[None]:
    """lm-eval and datasets kept off the network while this module runs, and only then:
    Ray workers started later must still reach a hub (the ``hf://`` download tests)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        # lm-eval's bootstrap forks a process pool; a fork of a process running JAX can hang.
        patch.setenv("DISABLE_MULTIPROC", "1")
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Export, task files, YAMLs, lm-eval's HF results and our direct results."""
    root = tmp_path_factory.mktemp("parity")
    tokenizer = train_bpe(stdlib_texts(15) + [" ".join(WORDS)] * 20, vocab_size=400)
    tokenizer.save(str(root / "tokenizer"))
    config = gptj(
        vocab_size=tokenizer.vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=128,
        rotary_dim=8,
        max_len=MAX_LEN,
    )
    params = random_params(config)
    export = export_hf(
        params,
        config,
        str(root / "hf"),
        tokenizer_dir=str(root / "tokenizer"),
        eos_token_id=tokenizer.eos_id,
    )
    rng = random.Random(0)
    include = root / "tasks"
    include.mkdir()
    files = {}
    for task, make in MAKERS.items():
        files[task] = root / f"{task}.jsonl"
        write_jsonl(files[task], [make(rng) for _ in range(DOCS)])
        (include / f"{task}.yaml").write_text(local_yaml(task, files[task]))
    pile = [t[i * 700 : i * 700 + rng.randint(0, 600)] for i, t in enumerate(stdlib_texts(8, 30))]
    files["pile"] = root / "pile.jsonl"
    write_jsonl(files["pile"], [{"text": t} for t in pile])
    pile_yaml = {**PILE_YAML, "dataset_kwargs": {"data_files": {"test": str(files["pile"])}}}
    (include / "pile.yaml").write_text(json.dumps(pile_yaml))
    tasks = [f"local_{t}" for t in [*MAKERS, "pile"]]
    manager = TaskManager(include_path=str(include))
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},dtype=float32",
        device="cpu",
        batch_size=8,
        tasks=tasks,
        task_manager=manager,
        log_samples=True,
    )
    lm = JaxLM.from_hf_dir(export, batch_size=8)
    ours = {t: evaluate_task(lm, t, load_documents(t, str(files[t]))) for t in MAKERS}
    ours["pile"] = evaluate_bits_per_byte(lm, {"local": pile})[-1]
    return {
        "root": root,
        "export": export,
        "lm": lm,
        "theirs": theirs,
        "ours": ours,
        "tasks": tasks,
        "manager": manager,
        "params": params,
        "config": config,
    }


@pytest.mark.parametrize("task", [*MAKERS, "pile"])
def test_metrics_equal_lm_evals(setup: dict[str, Any], task: str) -> None:
    theirs = setup["theirs"]["results"][f"local_{task}"]
    ours: TaskResult = setup["ours"][task]
    expected = {k: v for k, v in theirs.items() if "," in k and isinstance(v, float)}
    assert set(ours.metrics) == set(expected)
    for name, value in expected.items():
        if name.startswith(("acc,", "acc_norm,")):
            assert ours.metrics[name] == value, name
        else:
            assert ours.metrics[name] == pytest.approx(value, rel=RELATIVE_TOLERANCE), name
    assert ours.samples == (DOCS if task != "pile" else 8)


@pytest.mark.parametrize("task", [*MAKERS, "pile"])
def test_requests_and_loglikelihoods_equal_lm_evals(setup: dict[str, Any], task: str) -> None:
    samples = setup["theirs"]["samples"][f"local_{task}"]
    lm: JaxLM = setup["lm"]
    if task == "pile":
        ours = lm.loglikelihood_rolling([s["arguments"][0][0] for s in samples])
        assert np.allclose(ours, [s["resps"][0][0] for s in samples], rtol=1e-6, atol=1e-4)
        return
    docs = load_documents(task, str(setup["root"] / f"{task}.jsonl"))
    requests = [tuple(a) for s in samples for a in s["arguments"]]
    built = [r for s in samples for r in TASKS[task].question(docs[s["doc_id"]]).requests]
    assert requests == built
    theirs = [resp[0] for s in samples for resp in s["resps"]]
    ours = lm.loglikelihood(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True)) <= LL_TOLERANCE
    assert [a[1] for a in ours] == [b[1] for b in theirs]


@pytest.mark.parametrize("task", ["hellaswag", "pile"])
def test_meshline_model_in_lm_eval_gives_our_numbers(setup: dict[str, Any], task: str) -> None:
    results = lm_eval.simple_evaluate(
        model="meshline",
        model_args=f"checkpoint={setup['export']},batch_size=8",
        tasks=[f"local_{task}"],
        task_manager=setup["manager"],
    )["results"][f"local_{task}"]
    ours: TaskResult = setup["ours"][task]
    assert {k: results[k] for k in ours.metrics} == ours.metrics


def test_meshline_model_generates_greedily(setup: dict[str, Any]) -> None:
    model = MeshlineLM(checkpoint=setup["export"], batch_size=8)
    lm = model.lm
    prompt = "the man runs over"
    ids = generate(lm.config, lm.params, [lm.encode(prompt)], 12, eos_id=lm.tokenizer.eos_id)
    ids = ids[0].tolist()
    full = lm.tokenizer.decode(
        ids[: ids.index(lm.tokenizer.eos_id)] if lm.tokenizer.eos_id in ids else ids
    )
    assert len(full) > 2
    request = Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)
    assert model.generate_until([request]) == [full]
    stop = full[len(full) // 2 :]
    cut = Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)
    assert model.generate_until([cut]) == [full.split(stop)[0]]


def test_meshline_generation_batches_requests_as_if_alone(setup: dict[str, Any]) -> None:
    """Prompts of different lengths and options decode together (padded, batched, longest
    first) to what each gives alone."""
    model = MeshlineLM(checkpoint=setup["export"], batch_size=2)
    prompts = ["the man", "the man runs over the hill and", "a", "over the hill the man runs"]
    options = [{"until": [], "max_gen_toks": 6}, {"until": [" the"], "max_gen_toks": 9}]
    requests = [
        Instance("generate_until", {}, (p, options[i % 2]), i) for i, p in enumerate(prompts)
    ]
    alone = [model.generate_until([r])[0] for r in requests]
    assert model.generate_until(requests) == alone
    assert len({len(text) for text in alone}) > 1


def test_train_output_checkpoint_scores_as_its_export(setup: dict[str, Any]) -> None:
    train = str(setup["root"] / "train")
    write_checkpoint(setup["params"], setup["config"], train, step=3)
    tokenizer = load_tokenizer(str(setup["root"] / "tokenizer"))
    lm = JaxLM.from_train_output(train, tokenizer, batch_size=8)
    requests = [("the man runs", " over the river"), ("", "a dog"), ("a cat ", "sleeps")]
    assert np.allclose(lm.loglikelihood(requests), setup["lm"].loglikelihood(requests))
