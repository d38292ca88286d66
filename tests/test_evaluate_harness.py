"""The evaluator's parts without lm-eval's model run: request encoding edge cases, rolling
windows against lm-eval's own, batching that pads and shares prefixes without changing a
log-prob, metric stderrs against lm-eval's, and task files that are bad."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import linen as nn
from lm_eval.api import metrics as lm_metrics
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from stages.convert import ConvertError
from stages.evaluate import metrics
from stages.evaluate.harness import bucket, encode_pair, model_input, rolling_windows, split_prefix
from stages.evaluate.lm import JaxLM, _batches
from stages.evaluate.shapes import run_shapes
from stages.evaluate.tasks import TaskDataError, evaluate_task, load_documents
from stages.tokenize.bpe import train_bpe
from stages.tokenize.tokenizer import Tokenizer
from stages.train.model import forward, init_params
from stages.train.model_config import gptj
from stages.train.output import write_checkpoint

EOS = 0


def char_encode(text: str) -> list[int]:
    """One id per character, but "ab" is a single token: a merge across a split point."""
    return [300 if piece == "ab" else ord(piece) for piece in _pieces(text)]


def _pieces(text: str) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        step = 2 if text[i : i + 2] == "ab" else 1
        pieces.append(text[i : i + step])
        i += step
    return pieces


def test_trailing_context_spaces_move_to_the_continuation() -> None:
    context, continuation = encode_pair(char_encode, EOS, "x y  ", "z")
    assert context == char_encode("x y")
    assert continuation == char_encode("  z")


def test_pair_is_encoded_whole_and_split_at_the_context_length() -> None:
    # "a" + "b" encode as one token "ab": the continuation is what is left after the context.
    context, continuation = encode_pair(char_encode, EOS, "xa", "bc")
    assert context == [ord("x"), ord("a")]
    assert continuation == [ord("c")]


def test_empty_context_becomes_the_prefix_token() -> None:
    assert encode_pair(char_encode, EOS, "", "hi") == ([EOS], char_encode("hi"))
    starts_with_eos = encode_pair(lambda t: [EOS, *char_encode(t)], EOS, "", "hi")
    assert starts_with_eos == ([EOS], char_encode("hi"))


def test_long_requests_are_cut_from_the_left_and_drop_the_last_token() -> None:
    context, continuation = list(range(10, 20)), [20, 21, 22]
    assert model_input(context, continuation, 8) == [14, 15, 16, 17, 18, 19, 20, 21]
    scored = split_prefix(context, continuation, 8)
    assert scored.prefix == (14, 15, 16, 17, 18)
    assert scored.inputs == (19, 20, 21)
    assert scored.targets == (20, 21, 22)
    with pytest.raises(ValueError, match="exceeds max_length 2"):
        model_input([1], [2, 3, 4], 2)


@pytest.mark.parametrize("max_length", [1, 2, 5, 16])
def test_rolling_windows_are_lm_evals_and_predict_each_token_once(max_length: int) -> None:
    for length in range(0, 40):
        tokens = list(range(1, length + 1))
        ours = rolling_windows(tokens, EOS, max_length)
        theirs = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(tokens, EOS, max_length, context_len=1)
        ]
        assert ours == theirs
        assert [t for _, window in ours for t in window] == tokens
        assert all(len(c) + len(w) == max_length + 1 for c, w in ours[1:])


def test_buckets_are_few_and_cover_every_length() -> None:
    sizes = {bucket(n) for n in range(1, 2049)}
    assert len(sizes) <= 19
    assert all(bucket(n) >= n for n in range(0, 5000))


@cache
def tiny_lm(batch_size: int) -> JaxLM:
    tokenizer = _tokenizer()
    config = gptj(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        rotary_dim=4,
        max_len=24,
    )
    params = jax.tree.map(np.asarray, nn.unbox(init_params(config, jax.random.key(1))))
    return JaxLM(config, params, tokenizer, batch_size=batch_size)


@cache
def _tokenizer() -> Tokenizer:
    texts = [f"the {w} of {n} is {n * 7} and more" for w in ("sum", "cube") for n in range(60)]
    return train_bpe(texts, vocab_size=300)


def unpadded_loglikelihood(lm: JaxLM, context: str, continuation: str) -> float:
    """The log-prob from one unpadded forward pass over the harness's model input."""
    ctx, cont = encode_pair(lm.encode, lm.prefix_token, context, continuation)
    tokens = model_input(ctx, cont, lm.max_length)
    logits = np.asarray(forward(lm.config, lm.params, np.asarray([tokens])))[0]
    logprobs = jax.nn.log_softmax(logits[len(tokens) - len(cont) :], axis=-1)
    return float(sum(logprobs[i, t] for i, t in enumerate(cont)))


def requests() -> list[tuple[str, str]]:
    rng = random.Random(0)
    shared = "the cube of 12 is"
    out = [(shared, f" {n}") for n in (84, 85, 7, 1000)]
    out += [
        (f"the sum of {rng.randrange(60)} is", f" {rng.randrange(500)} and more") for _ in range(3)
    ]
    out += [("", "the sum"), ("the sum of 3 is 21 and more " * 4, "the cube")]
    return [*out, out[0], out[5]]


def test_padded_shared_batches_give_unpadded_logprobs() -> None:
    reqs = requests()
    expected = [unpadded_loglikelihood(tiny_lm(4), c, k) for c, k in reqs]
    for batch_size in (2, 4, 32):
        got = tiny_lm(batch_size).loglikelihood(reqs)
        assert np.allclose([ll for ll, _ in got], expected, atol=1e-4)
    assert tiny_lm(4).loglikelihood(reqs)[-1] == tiny_lm(4).loglikelihood(reqs)[5]


def test_batches_run_each_unique_request_once_in_bucket_shapes() -> None:
    lm = tiny_lm(4)
    scored = [split_prefix(*encode_pair(lm.encode, EOS, c, k), 24) for c, k in requests()]
    unique = list(dict.fromkeys(scored))
    seen = []
    for batch, real in _batches(unique, 4, EOS):
        assert real == len(batch.members) <= batch.inputs.shape[0] <= 4
        assert batch.prefix.shape[1] == bucket(batch.prefix.shape[1])
        assert batch.inputs.shape[1] == bucket(batch.inputs.shape[1])
        seen.extend(batch.members)
    assert sorted(seen) == list(range(len(unique)))
    # The four choices after "the cube of 12 is" share one prefix row.
    shared = {u.prefix for u in unique[:4]}
    assert len(shared) == 1


def test_rolling_loglikelihood_sums_the_windows() -> None:
    lm = tiny_lm(4)
    text = "the sum of 5 is 35 and more " * 6
    tokens = lm.encode(text)
    assert len(tokens) > 2 * lm.max_length
    expected = 0.0
    for context, window in rolling_windows(tokens, lm.prefix_token, lm.max_length):
        expected += lm.score([split_prefix(context, window, lm.max_length)])[0][0]
    assert lm.loglikelihood_rolling([text, ""]) == pytest.approx([expected, 0.0], abs=1e-4)


def test_stderrs_are_lm_evals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    lls = list(np.random.default_rng(0).normal(-3, 1, 37))
    theirs = lm_metrics.bootstrap_stderr(lm_metrics.perplexity, lls, iters=2000)
    assert metrics.bootstrap_perplexity_stderr(lls, 2000) == pytest.approx(theirs, rel=1e-9)
    accs = [float(x > -3) for x in lls]
    assert metrics.mean_stderr(accs) == pytest.approx(lm_metrics.mean_stderr(accs), rel=1e-12)


def test_acc_norm_divides_by_character_length() -> None:
    # Choice 0 has the higher log-likelihood, choice 1 the higher per-character one.
    result = metrics.multiple_choice([[-4.0, -5.0]], [[2.0, 10.0]], [1], ("acc", "acc_norm"))
    assert result == {"acc,none": 0.0, "acc_norm,none": 1.0}


def test_checkpoint_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    lm = tiny_lm(4)
    wider = lm.config.model_copy(update={"d_ff": 96})
    write_checkpoint(jax.tree.map(np.asarray, lm.params), wider, str(tmp_path / "train"))
    named = r"train: tensor layers/mlp/fc_in/\w+ has shape \(2, 64\), expected \(2, 96\)"
    with pytest.raises(ConvertError, match=named):
        JaxLM.from_train_output(str(tmp_path / "train"), lm.tokenizer)


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


PIQA = {"goal": "open a jar", "sol1": "twist", "sol2": "pull", "label": 0}


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    bad = {k: v for k, v in PIQA.items() if k != "sol2"}
    path = write(tmp_path / "piqa.jsonl", [json.dumps(PIQA), "", json.dumps(bad)])
    with pytest.raises(TaskDataError, match=r"piqa\.jsonl:3: .*'sol2'"):
        load_documents("piqa", path)
    arc = {"question": "q", "choices": {"text": ["a", "b"]}, "answerKey": "A"}
    path = write(tmp_path / "arc.jsonl", [json.dumps(arc)])
    with pytest.raises(TaskDataError, match=r"arc\.jsonl:1: .*'choices\.label'"):
        load_documents("arc_easy", path)


def test_empty_or_malformed_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"empty\.jsonl: no piqa documents"):
        load_documents("piqa", write(tmp_path / "empty.jsonl", []))
    with pytest.raises(TaskDataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_documents("piqa", write(tmp_path / "broken.jsonl", [json.dumps(PIQA), "{"]))
    wrong = {**PIQA, "label": 5}
    with pytest.raises(TaskDataError, match=r"gold\.jsonl:1: bad piqa document.*gold index 5"):
        load_documents("piqa", write(tmp_path / "gold.jsonl", [json.dumps(wrong)]))
    with pytest.raises(TaskDataError, match="missing.jsonl: cannot read"):
        load_documents("piqa", str(tmp_path / "missing.jsonl"))


def test_parquet_and_json_files_load_and_name_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "wino.parquet")
    rows = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}] * 2
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_documents("winogrande", path) == rows
    json_path = tmp_path / "wino.json"
    json_path.write_text(json.dumps([rows[0], {"sentence": "x"}]))
    with pytest.raises(TaskDataError, match=r"wino\.json: record 2: .*'option1'"):
        load_documents("winogrande", str(json_path))


def test_evaluate_task_reports_harness_keys() -> None:
    docs = [{"text": "the sum of 3 is 21"}, {"text": "the cube of 2 is 8"}]
    result = evaluate_task(tiny_lm(4), "lambada_openai", docs, bootstrap_iters=1000)
    keys = {"perplexity,none", "perplexity_stderr,none", "acc,none", "acc_stderr,none"}
    assert set(result.metrics) == keys and result.samples == 2


def test_rare_shapes_run_padded_to_a_compiled_larger_one() -> None:
    def area(shape: tuple[int, ...]) -> int:
        return shape[0] * shape[1]

    shapes = [(4, 64), (4, 32), (2, 128), (4, 24), *[(4, 8)] * 50, (2, 8)]
    got = run_shapes(shapes, area)
    # Padding one run to twice its size costs one run of its own: as much as a compile.
    assert got[1] == (4, 64)
    # Nothing compiled holds (2, 128).
    assert got[2] == (2, 128)
    # One run padded 8/3x, or fifty padded 4x, would cost more than their own compile.
    assert got[3] == (4, 24)
    assert got[4:54] == [(4, 8)] * 50
    assert got[54] == (4, 8)
