"""The demo corpus builder: Pile layout, same bytes every build, duplicates for dedup to
find, correct arithmetic, idempotent rebuilds and validated config."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
import zstandard
from pydantic import ValidationError

from stages.demo_corpus import GITHUB, MATH, DemoCorpusConfig, build_demo_corpus

# Small enough to build in about a second, large enough to hold every kind of document.
SMALL = DemoCorpusConfig(train_shards=3, max_text_mb=1.0, math_documents=100)
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    dest = tmp_path_factory.mktemp("demo-corpus")
    return dest, build_demo_corpus(str(dest), SMALL)


def split_of(name: str) -> str:
    return "train" if name.startswith("train/") else name.removesuffix(".jsonl.zst")


def read_lines(path: Path) -> list[str]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    text = data.decode("utf-8")
    assert text.endswith("\n")
    # Split on "\n" only, as a JSONL reader must: str.splitlines would also cut at the
    # U+2028 or U+0085 that JSON leaves unescaped inside a text.
    return text[:-1].split("\n")


def documents(corpus: tuple[Path, list[str]]) -> list[tuple[str, str, str]]:
    """(split, component, text) of every line of every file."""
    dest, names = corpus
    docs = []
    for name in names:
        for line in read_lines(dest / name):
            record = json.loads(line)
            docs.append((split_of(name), record["meta"]["pile_set_name"], record["text"]))
    return docs


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_is_the_piles(corpus: tuple[Path, list[str]]) -> None:
    dest, names = corpus
    expected = ["train/00.jsonl.zst", "train/01.jsonl.zst", "train/02.jsonl.zst"]
    assert names == [*expected, "val.jsonl.zst", "test.jsonl.zst"]
    assert sorted(all_files(dest)) == sorted([*names, "SHA256SUMS.txt"])


def test_two_builds_give_the_same_bytes(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    build_demo_corpus(str(tmp_path), SMALL)
    assert all_files(tmp_path) == all_files(corpus[0])


def test_checksums_match_the_files(corpus: tuple[Path, list[str]]) -> None:
    dest, names = corpus
    lines = (dest / "SHA256SUMS.txt").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == names
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest


def test_every_line_is_pile_json(corpus: tuple[Path, list[str]]) -> None:
    dest, names = corpus
    for name in names:
        components = Counter()
        for line in read_lines(dest / name):
            record = json.loads(line)
            assert set(record) == {"text", "meta"}
            assert record["meta"].keys() == {"pile_set_name"}
            assert isinstance(record["text"], str) and record["text"].strip()
            assert line == json.dumps(record, ensure_ascii=False)
            components[record["meta"]["pile_set_name"]] += 1
        # Math is interleaved: every file, each train shard included, holds both components.
        assert set(components) == {GITHUB, MATH}, name


def test_text_stays_within_the_budget(corpus: tuple[Path, list[str]]) -> None:
    total = sum(len(text.encode("utf-8")) for _, _, text in documents(corpus))
    budget = SMALL.max_text_mb * 1_000_000
    assert 0.8 * budget <= total <= budget


def test_exact_and_near_duplicates_exist(corpus: tuple[Path, list[str]]) -> None:
    docs = documents(corpus)
    train = Counter(text for split, _, text in docs if split == "train")
    assert sum(n - 1 for n in train.values()) > 0
    unedited = {t.replace("  # edited", "", 1) for t in train if "  # edited" in t}
    edited = unedited & set(train)
    assert edited, "no train document is another with one line changed"


def test_some_held_out_documents_also_occur_in_train(corpus: tuple[Path, list[str]]) -> None:
    docs = documents(corpus)
    train = {text for split, _, text in docs if split == "train"}
    held_out = {text for split, _, text in docs if split != "train"}
    assert train & held_out


def test_every_split_holds_both_components(corpus: tuple[Path, list[str]]) -> None:
    present = {(split, component) for split, component, _ in documents(corpus)}
    assert present == {(s, c) for s in SPLITS for c in (GITHUB, MATH)}
    math_texts = {text for _, component, text in documents(corpus) if component == MATH}
    assert len(math_texts) == SMALL.math_documents


NUMBER = r"-?\d+(?:\.\d+)?"
# Question forms whose answer is a binary operation on two numbers.
BINARY = [
    (rf"What is ({NUMBER}) plus ({NUMBER})\?", lambda a, b: a + b),
    (rf"(?:Add|Sum) ({NUMBER}) and ({NUMBER})\.", lambda a, b: a + b),
    (rf"Calculate ({NUMBER}) \+ ({NUMBER})\.", lambda a, b: a + b),
    (rf"What is ({NUMBER}) (?:take away|minus) ({NUMBER})\?", lambda a, b: a - b),
    (rf"Subtract ({NUMBER}) from ({NUMBER})\.", lambda b, a: a - b),
    (rf"Calculate ({NUMBER}) - ({NUMBER})\.", lambda a, b: a - b),
    (rf"What is ({NUMBER}) times ({NUMBER})\?", lambda a, b: a * b),
    (rf"(?:Multiply|What is the product of) ({NUMBER}) and ({NUMBER})[.?]", lambda a, b: a * b),
    (rf"Calculate ({NUMBER})\*({NUMBER})\.", lambda a, b: a * b),
]
EXPRESSION = re.compile(r"(?:What is the value of |Evaluate |What is )([-+*() \d]+)[.?]")
EQUATION = re.compile(r"Solve ([-+*= \w]+) for ([a-z])\.")


def integer_expression(expression: str) -> int:
    assert re.fullmatch(r"[-+*() \d]+", expression), expression
    return eval(expression, {"__builtins__": {}})  # only digits and operators, checked above


def correct(question: str, answer: str) -> bool:
    for pattern, operation in BINARY:
        if match := re.fullmatch(pattern, question):
            a, b = (Decimal(x) for x in match.groups())
            return Decimal(answer) == operation(a, b)
    if match := EQUATION.fullmatch(question):
        equation, variable = match.groups()
        left, right = (side.replace(variable, f"({answer})") for side in equation.split(" = "))
        return integer_expression(left) == integer_expression(right)
    if match := EXPRESSION.fullmatch(question):
        return integer_expression(match.group(1)) == int(answer)
    raise AssertionError(f"unknown question form: {question!r}")


def test_math_answers_are_correct(corpus: tuple[Path, list[str]]) -> None:
    math = [text for _, component, text in documents(corpus) if component == MATH]
    forms = Counter()
    for text in math:
        lines = text.splitlines()
        assert text.endswith("\n") and len(lines) == 2 * SMALL.questions_per_math_document
        for question, answer in zip(lines[::2], lines[1::2], strict=True):
            assert re.fullmatch(NUMBER, answer), (question, answer)
            assert answer != "-0" and not re.search(r"\.\d*0$", answer), answer
            assert correct(question, answer), (question, answer)
            forms[question.split()[0]] += 1
    assert {"What", "Add", "Sum", "Subtract", "Calculate", "Multiply", "Evaluate", "Solve"} <= set(
        forms
    )


def test_a_second_build_leaves_the_files_alone(corpus: tuple[Path, list[str]]) -> None:
    dest, names = corpus
    before = {p: os.stat(p).st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    assert build_demo_corpus(str(dest), SMALL) == names
    assert {p: os.stat(p).st_mtime_ns for p in dest.rglob("*") if p.is_file()} == before


def test_a_damaged_file_is_rebuilt(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    dest = tmp_path / "mirror"
    shutil.copytree(corpus[0], dest)
    (dest / "val.jsonl.zst").write_bytes(b"truncated")
    build_demo_corpus(str(dest), SMALL)
    assert all_files(dest) == all_files(corpus[0])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train_shards": 0}, "train_shards"),
        ({"max_text_mb": 0}, "max_text_mb"),
        ({"math_documents": -1}, "math_documents"),
        ({"val_fraction": 0.3, "test_fraction": 0.3}, "val_fraction + test_fraction"),
        ({"shards": 4}, "shards"),
    ],
)
def test_bad_config_is_rejected(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(field)):
        DemoCorpusConfig(**overrides)


def test_a_budget_too_small_for_the_math_is_refused(tmp_path: Path) -> None:
    config = DemoCorpusConfig(max_text_mb=0.05, math_documents=100)
    with pytest.raises(ValueError, match="max_text_mb"):
        build_demo_corpus(str(tmp_path), config)
    assert not any(tmp_path.iterdir())
