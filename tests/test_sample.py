"""``meshline sample``: greedy and nucleus continuations side by side, from a Hugging Face
export and from a train-stage-style checkpoint, through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from flax import linen as nn

from pipeline.cli import main
from stages.convert import export_hf
from stages.evaluate.columns import COLUMN, side_by_side
from stages.tokenize.bpe import train_bpe
from stages.train.generate import generate
from stages.train.model import init_params
from stages.train.model_config import gptj
from stages.train.output import write_checkpoint

PROMPT = "the cube of 12 is"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny GPT-J with a trained BPE: exported to HF and written as a train output."""
    root = tmp_path_factory.mktemp("sample")
    texts = [f"the {w} of {n} is {n * 7} and more" for w in ("sum", "cube") for n in range(60)]
    tokenizer = train_bpe(texts, vocab_size=300)
    tokenizer.save(str(root / "tok" / "tokenizer"))
    config = gptj(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=64, rotary_dim=4)
    params = jax.device_get(nn.unbox(init_params(config, jax.random.key(3))))
    hf = export_hf(
        params,
        config,
        str(root / "hf"),
        tokenizer_dir=str(root / "tok" / "tokenizer"),
        eos_token_id=tokenizer.eos_id,
    )
    write_checkpoint(params, config, str(root / "train"))
    ids = tokenizer.encode(PROMPT)
    greedy = generate(config, params, [ids], max_new_tokens=10, eos_id=tokenizer.eos_id)[0]
    tokens = list(greedy)
    if tokenizer.eos_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_id)]
    return {
        "hf": hf,
        "train": str(root / "train"),
        "tok": str(root / "tok"),
        "greedy": tokenizer.decode(tokens),
    }


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["sample", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def columns(out: str) -> tuple[str, str]:
    """The greedy and nucleus texts of one rendering (wrapped lines joined back)."""
    body = out.splitlines()[3:]
    left = "".join(line[:COLUMN].rstrip() for line in body)
    right = "".join(line[COLUMN + 3 :] for line in body)
    return left, right


def test_hf_export_prints_greedy_beside_nucleus(model: dict[str, str], capsys) -> None:
    code, out, _ = run(capsys, model["hf"], PROMPT, "--max-new-tokens", "10", "--seed", "1")
    assert code == 0
    assert out.splitlines()[0] == f"prompt: {PROMPT!r}"
    assert "greedy" in out.splitlines()[1] and "nucleus (top_p 0.9" in out.splitlines()[1]
    greedy, nucleus = columns(out)
    assert greedy and nucleus
    again = run(capsys, model["hf"], PROMPT, "--max-new-tokens", "10", "--seed", "1")[1]
    other_seed = run(capsys, model["hf"], PROMPT, "--max-new-tokens", "10", "--seed", "2")[1]
    assert again == out
    assert columns(other_seed)[0] == greedy and other_seed != out


def test_train_output_with_tokenizer_matches_the_export(model: dict[str, str], capsys) -> None:
    from_hf = run(capsys, model["hf"], PROMPT, "--max-new-tokens", "10")[1]
    code, out, _ = run(
        capsys, model["train"], PROMPT, "--max-new-tokens", "10", "--tokenizer", model["tok"]
    )
    assert code == 0 and out == from_hf


def test_greedy_column_is_our_generate(model: dict[str, str], capsys) -> None:
    out = run(capsys, model["hf"], PROMPT, "--max-new-tokens", "10")[1]
    assert columns(out)[0] == columns(side_by_side(PROMPT, model["greedy"], ""))[0]


def test_paths_that_are_not_models_are_named(model: dict[str, str], tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, str(tmp_path), PROMPT)
    assert code == 2 and str(tmp_path) in err and "neither a train stage output" in err
    code, _, err = run(capsys, model["train"], PROMPT)
    assert code == 2 and "--tokenizer" in err
    code, _, err = run(capsys, model["hf"], PROMPT, "--max-new-tokens", "5000")
    assert code == 2 and "max_len" in err


def test_side_by_side_wraps_both_columns() -> None:
    text = side_by_side("p", "a" * 100, "b\nc", width=40)
    lines = text.splitlines()
    assert lines[3] == f"{'a' * 40} | b" and lines[4] == f"{'a' * 40} | c"
    assert lines[5] == f"{'a' * 20:<40} |" and len(lines) == 6
    assert all(line[40:42] == " |" for line in lines[3:])
