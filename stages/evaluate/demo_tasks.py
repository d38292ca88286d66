"""The demo's offline tasks, generated from held-out text in the formats of real tasks.

The demo has no internet, so its zero-shot tasks are made from the dedup stage's held-out
split (``{dedup}/{split}/part-*.parquet``) and then scored by the real task code, exactly
as a downloaded file of that task would be:

- a LAMBADA file (``{"text": passage}``, scored as ``lambada_openai``): each passage ends
  with a word that already occurs earlier in it (LAMBADA's "predictable from the broader
  context"), e.g. ``plus`` in a run of "What is a plus b?" questions or ``self`` in a
  method body;
- a HellaSwag file (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``, ``label``, scored
  as ``hellaswag``): a passage and four endings, its own and three from other documents of
  the same component, nearest in length (so length alone picks nothing). For text the
  ending is the rest of a line after its first word (context, space, ending is the
  document's own text); for the arithmetic documents it is the next question, which only
  a model that read the earlier questions' kind can tell from questions of other kinds.

Everything is chosen by a seeded ``random.Random`` over the documents in their stored
order, so the files are the same bytes on every run. ``read_split`` is also what the
bits-per-byte measurement reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.parquet as pq

from pipeline import storage
from stages.demo_corpus import MATH

_FIRST_WORD = re.compile(r"\s*\S+ ")
_WORD = re.compile(r"(?<= )[A-Za-z_]{2,}(?![A-Za-z0-9_])")
# A LAMBADA target needs this much passage before it to be predictable at all.
_MIN_CONTEXT_CHARS = 40
_ENDING_CHARS = (4, 100)
CHOICES = 4
# Distractors are drawn from this many other-document lines nearest in length.
_NEAREST = 12
T = TypeVar("T")


@dataclass(frozen=True)
class Document:
    """One held-out document as the dedup stage wrote it."""

    text: str
    component: str
    doc_id: str


def read_split(dedup: str, split: str) -> list[Document]:
    """The documents of ``{dedup}/{split}/part-*.parquet`` in part and row order."""
    parts = sorted(storage.glob(storage.join(dedup, split, "part-*.parquet")))
    if not parts:
        raise FileNotFoundError(f"{storage.join(dedup, split)}: no part-*.parquet files")
    documents = []
    for part in parts:
        with storage.open_file(part, "rb") as f:
            table = pq.read_table(f, columns=["text", "pile_set_name", "doc_id"])
        for row in table.to_pylist():
            documents.append(Document(row["text"], row["pile_set_name"], row["doc_id"]))
    return documents


def component_texts(documents: Iterable[Document], max_bytes: int) -> dict[str, list[str]]:
    """Each component's documents in order, up to ``max_bytes`` of UTF-8 per component
    (the document that crosses the budget is cut at it)."""
    texts: dict[str, list[str]] = {}
    used: dict[str, int] = {}
    for doc in documents:
        left = max_bytes - used.get(doc.component, 0)
        if left <= 0:
            continue
        data = doc.text.encode("utf-8")[:left]
        texts.setdefault(doc.component, []).append(data.decode("utf-8", errors="ignore"))
        used[doc.component] = used.get(doc.component, 0) + len(data)
    return dict(sorted(texts.items()))


def _window_start(text: str, end: int, max_chars: int) -> int:
    """Where a passage ending at ``end`` starts: the first line start within ``max_chars``."""
    start = max(0, end - max_chars)
    if start == 0:
        return 0
    newline = text.find("\n", start, end)
    return start if newline < 0 else newline + 1


def _lambada_candidates(doc: Document, max_chars: int) -> list[str]:
    """Passages of ``doc`` ending with a word (after a space) seen earlier in the passage."""
    passages = []
    for match in _WORD.finditer(doc.text):
        start = _window_start(doc.text, match.end(), max_chars)
        before = doc.text[start : match.start()]
        if len(before) >= _MIN_CONTEXT_CHARS and re.search(
            rf"(?<![A-Za-z0-9_]){match.group()}(?![A-Za-z0-9_])", before
        ):
            passages.append(doc.text[start : match.end()])
    return passages


def _balanced(pools: dict[str, list[T]], count: int, rng: random.Random) -> list[T]:
    """About ``count`` items drawn evenly from each component's pool, in pool order."""
    chosen = []
    share = -(-count // max(1, len(pools)))
    for component in sorted(pools):
        pool = pools[component]
        chosen.extend(pool[i] for i in sorted(rng.sample(range(len(pool)), min(share, len(pool)))))
    return chosen[:count]


def lambada_items(documents: Sequence[Document], count: int, max_chars: int, seed: int) -> list:
    """LAMBADA-format documents ``{"text": passage}``."""
    pools: dict[str, list[str]] = {}
    for doc in documents:
        pools.setdefault(doc.component, []).extend(_lambada_candidates(doc, max_chars))
    chosen = _balanced(pools, count, random.Random(f"{seed}/lambada"))
    return [{"text": passage} for passage in chosen]


@dataclass(frozen=True)
class _Line:
    """A candidate ending: ``text`` starts at offset ``start`` of document ``doc``."""

    doc: int
    start: int
    component: str
    text: str


def _eligible(text: str) -> bool:
    """An ending HellaSwag's preprocessing leaves as it is (it deletes bracketed text)."""
    low, high = _ENDING_CHARS
    return low <= len(text) <= high and "[" not in text and "]" not in text


def _line_endings(doc: Document, d: int) -> list[_Line]:
    """Arithmetic: every question line after the first (which of the generator's question
    kinds comes next is what the context tells). Other text: the rest of every line after
    its first word, so that context, a space and the ending are the document's own text."""
    endings, offset = [], 0
    for i, line in enumerate(doc.text.split("\n")):
        if doc.component == MATH:
            if i > 0 and i % 2 == 0 and _eligible(line):
                endings.append(_Line(d, offset, doc.component, line))
        else:
            match = _FIRST_WORD.match(line)
            rest = line[match.end() :].rstrip() if match else ""
            if offset + (match.end() if match else 0) > _MIN_CONTEXT_CHARS and _eligible(rest):
                endings.append(_Line(d, offset + match.end(), doc.component, rest))
        offset += len(line) + 1
    return endings


def _distractors(line: _Line, every: Sequence[_Line], rng: random.Random) -> list[str] | None:
    """Three endings of other documents of the same component, among those closest to
    ``line`` in length, so that neither the summed nor the length-normalised score can
    pick the real one by its length alone."""
    others = sorted(
        {
            o.text
            for o in every
            if o.component == line.component and o.doc != line.doc and o.text != line.text
        },
        key=lambda text: (abs(len(text) - len(line.text)), text),
    )
    if len(others) < CHOICES - 1:
        return None
    return rng.sample(others[:_NEAREST], CHOICES - 1)


def _choice_item(
    documents: Sequence[Document],
    line: _Line,
    every: Sequence[_Line],
    max_chars: int,
    rng: random.Random,
) -> dict | None:
    doc = documents[line.doc]
    end = line.start - 1
    context = doc.text[_window_start(doc.text, end, max_chars) : end]
    endings = _distractors(line, every, rng)
    if not context.strip() or endings is None:
        return None
    gold = rng.randrange(CHOICES)
    endings.insert(gold, line.text)
    return {
        "ind": 0,
        "activity_label": doc.component,
        "ctx_a": context,
        "ctx_b": "",
        "ctx": context,
        "endings": endings,
        "source_id": f"{doc.doc_id}@{line.start}",
        "split": "validation",
        "split_type": "indomain",
        "label": str(gold),
    }


def choice_items(documents: Sequence[Document], count: int, max_chars: int, seed: int) -> list:
    """HellaSwag-format documents: a passage and four endings, one of them its own."""
    rng = random.Random(f"{seed}/choice")
    every = [line for d, doc in enumerate(documents) for line in _line_endings(doc, d)]
    pools: dict[str, list[_Line]] = {}
    for line in every:
        pools.setdefault(line.component, []).append(line)
    items = []
    for line in _balanced(pools, count, rng):
        item = _choice_item(documents, line, every, max_chars, rng)
        if item is not None:
            items.append({**item, "ind": len(items)})
    return items


def jsonl(items: Iterable[dict]) -> bytes:
    """JSON Lines bytes, keys in insertion order, non-ASCII kept."""
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode("utf-8")
