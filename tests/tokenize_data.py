"""Shared inputs of the tokenize tests: GPT-2's real ranks, real and adversarial text, and
dedup-style Parquet parts written by hand (dedup's output contract)."""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq


def gpt2_ranks_path() -> str:
    """GPT-2's BPE ranks as openai-whisper ships them (the package is not imported)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install --no-deps openai-whisper (the README test command does)")
    return os.path.join(spec.submodule_search_locations[0], "assets", "gpt2.tiktoken")


def stdlib_texts(count: int, offset: int = 0) -> list[str]:
    """Real text: source files of this Python's standard library, in name order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts = []
    for path in files[offset : offset + count]:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


ADVERSARIAL = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n\n",
    " \t \r\n \x0b\x0c ",
    "Hello world",
    "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|><|endoftext|> <|endo",
    "I'm you'll they've he'd she's WE'RE 'S 'll",
    "naïve café, Ünïcödé, ﬁ ligature, e\u0301 combining",
    "日本語のテキスト 中文 한국어 العربية עברית ไทย",
    "🎉🎉🎉 👩\u200d👩\u200d👧\u200d👦 🇺🇸🇯🇵 🏳️\u200d🌈",
    "nbsp\u00a0here\u3000ideographic\u2028line\u2029para\u200bzw",
    "\x00\x01\x1c\x1d\x1e\x1f\x7f control",
    "x" + " " * 1000 + "y",
    " " * 5000,
    "\t" * 300 + "tabs",
    "word\n" * 200,
    "3.14159 1e-10 0x1F 1,000,000 ١٢٣ ½",
    "a" * 5000,
    "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@",
    "def f(x):\n    return x ** 2  # comment\n\n\n    \n",
]


def random_texts(seed: int, count: int, length: int) -> list[str]:
    """Random strings over letters, digits, punctuation, whitespace runs and emoji."""
    rng = random.Random(seed)
    pool = list("abcXYZ019 \t\n\r'.,!?-_") + ["  ", "   ", "\n\n", "é", "日", "🎉", "\u00a0"]
    pool += ["<|endoftext|>", "'s", " 's", "٣"]
    return ["".join(rng.choice(pool) for _ in range(length)) for _ in range(count)]


def write_part(path: str, rows: list[tuple[str | None, str | None, str]]) -> None:
    """One dedup-style Parquet part (zstd): text, pile_set_name, doc_id; row groups of 8
    rows, so that a part is several work items."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table(
        {
            "text": pa.array([r[0] for r in rows], pa.string()),
            "pile_set_name": pa.array([r[1] for r in rows], pa.string()),
            "doc_id": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    pq.write_table(table, path, compression="zstd", row_group_size=8)
