"""The demo's corpus: a small Pile-format mirror built offline, the same bytes every time.

``build_demo_corpus`` writes what the Pile's mirrors publish (``train/NN.jsonl.zst``,
``val.jsonl.zst``, ``test.jsonl.zst``, ``SHA256SUMS.txt``) from two components:

- "Github": source files of this Python installation's standard library (and the
  ``.py`` members of the wheels it bundles for ``ensurepip``), each with a second document
  holding its docstrings. The bundled wheels vendor the same packages several times, which
  gives the dedup stage real exact and near duplicates.
- "DM Mathematics": generated question/answer documents in DeepMind Mathematics' style
  (a question line, then its answer line), regular enough for a tiny model to learn.

A few deliberate copies guarantee that every kind of duplicate the pipeline removes is
present whatever the installation holds: exact copies and one-line edits inside train, and
held-out documents leaked into train (the Pile removes train documents found in val/test).

The download stage materialises this directory as a local mirror and then downloads from
it like from any other mirror.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sysconfig
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import zstandard
from pydantic import Field, model_validator

from pipeline import storage
from pipeline.stage import StageConfig

GITHUB = "Github"
MATH = "DM Mathematics"
CHECKSUMS = "SHA256SUMS.txt"

# Fixed so that the compressed bytes (and so SHA256SUMS.txt) never change between builds.
_ZSTD_LEVEL = 3
# Injected copies are taken from documents at most this large, so that the budget can set
# aside room for them before the Github component is chosen.
_COPY_MAX_BYTES = 8_000
# A one-line edit leaves a document near its original only if it has enough other lines.
_NEAR_DUPLICATE_MIN_LINES = 10
# What a near duplicate adds to its line: a change that keeps the line's meaning.
_EDIT_MARK = "  # edited"
_SKIPPED_DIRS = frozenset({"site-packages", "__pycache__"})


class DemoCorpusConfig(StageConfig):
    """What the demo corpus holds and how it is cut into files."""

    train_shards: int = Field(default=4, ge=1, le=100)
    """Number of train files, ``train/00.jsonl.zst`` onwards."""
    max_text_mb: float = Field(default=12.0, gt=0)
    """Budget of uncompressed text (UTF-8 bytes of every document, all splits, in 10^6
    bytes); the Github component fills what the math documents and copies leave."""
    math_documents: int = Field(default=2000, ge=1)
    """Number of generated "DM Mathematics" documents."""
    questions_per_math_document: int = Field(default=30, ge=1)
    """Question/answer pairs in each math document (all of one kind, as in DM)."""
    docstrings: bool = True
    """Also add, for each source file, a document of its docstrings (English prose)."""
    max_file_kb: int = Field(default=256, ge=1)
    """Source files larger than this are skipped (generated tables would dominate)."""
    val_fraction: float = Field(default=0.02, ge=0, lt=0.5)
    """Share of each component's documents held out as val (at least one if above 0)."""
    test_fraction: float = Field(default=0.02, ge=0, lt=0.5)
    """Share of each component's documents held out as test (at least one if above 0)."""
    exact_duplicates: int = Field(default=4, ge=0)
    """Train documents copied verbatim into train again."""
    near_duplicates: int = Field(default=8, ge=0)
    """Github train documents copied into train again with one line changed."""
    contaminated_documents: int = Field(default=4, ge=0)
    """Val/test documents also copied into train, for decontamination to remove."""
    seed: int = 0
    """Seed of every choice: which files, which split, the math questions, the shuffles."""

    @model_validator(mode="after")
    def _held_out_leaves_train(self) -> DemoCorpusConfig:
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ValueError("val_fraction + test_fraction must leave most documents in train")
        return self


@dataclass(frozen=True)
class _Doc:
    text: str
    component: str

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class _Unit:
    """Documents that go to the same split together (a file and its docstrings)."""

    key: str
    docs: tuple[_Doc, ...]


@dataclass(frozen=True)
class _Source:
    name: str
    """Path relative to the stdlib root; a wheel member is ``<wheel path>/<member>``."""
    text: str


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_demo_corpus(dest: str, config: DemoCorpusConfig) -> list[str]:
    """Write train/00.jsonl.zst.., val.jsonl.zst, test.jsonl.zst and SHA256SUMS.txt under
    dest; return the data files' names relative to dest (SHA256SUMS.txt, written last, is
    not among them).

    A dest whose SHA256SUMS.txt already lists exactly these files, with matching hashes,
    is left untouched, whatever config built it: give each config its own dest (named by
    its fingerprint, say). Raises ValueError when the budget cannot hold the requested math
    documents, the reserved copies and at least one Github document per split.
    """
    names = [f"train/{k:02d}.jsonl.zst" for k in range(config.train_shards)]
    names += ["val.jsonl.zst", "test.jsonl.zst"]
    if _already_built(dest, names):
        return names
    files = dict(zip(names, _corpus_files(config), strict=True))
    for name, data in files.items():
        storage.write_atomic(storage.join(dest, name), data)
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
    storage.write_atomic(storage.join(dest, CHECKSUMS), sums.encode())
    return names


def _already_built(dest: str, names: list[str]) -> bool:
    sums_uri = storage.join(dest, CHECKSUMS)
    if not storage.exists(sums_uri):
        return False
    listed = [line.partition("  ") for line in storage.read_text(sums_uri).splitlines()]
    if [name for _, _, name in listed] != names:
        return False
    for digest, _, name in listed:
        uri = storage.join(dest, name)
        if not storage.exists(uri) or hashlib.sha256(storage.read_bytes(uri)).hexdigest() != digest:
            return False
    return True


def _corpus_files(config: DemoCorpusConfig) -> list[bytes]:
    """Compressed contents of the train shards, then val, then test."""
    budget = int(config.max_text_mb * 1_000_000)
    math_units = [_Unit(f"math/{i}", (doc,)) for i, doc in enumerate(_math_documents(config))]
    copies = config.exact_duplicates + config.near_duplicates + config.contaminated_documents
    github_budget = budget - sum(u.docs[0].size for u in math_units) - copies * _COPY_MAX_BYTES
    if github_budget <= 0:
        raise ValueError(
            f"max_text_mb={config.max_text_mb} cannot hold {config.math_documents} "
            f"math_documents and {copies} injected copies: raise max_text_mb or lower them"
        )
    sources = _stdlib_sources(sysconfig.get_paths()["stdlib"], config.max_file_kb * 1024)
    github_units = _select_github(sources, github_budget, config)
    train: list[_Doc] = []
    val: list[_Doc] = []
    test: list[_Doc] = []
    for units in (github_units, math_units):
        unit_train, unit_val, unit_test = _assign_splits(units, config)
        train += unit_train
        val += unit_val
        test += unit_test
    rng = random.Random(f"{config.seed}/copies")
    train += _copies(train, val + test, config, rng)
    shuffle = random.Random(f"{config.seed}/shuffle")
    for docs in (train, val, test):
        shuffle.shuffle(docs)
    shards = [train[k :: config.train_shards] for k in range(config.train_shards)]
    return [_compress(docs) for docs in [*shards, val, test]]


def _compress(docs: list[_Doc]) -> bytes:
    lines = (
        json.dumps({"text": d.text, "meta": {"pile_set_name": d.component}}, ensure_ascii=False)
        + "\n"
        for d in docs
    )
    # threads=0: one thread compresses in one deterministic frame layout.
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=0)
    return compressor.compress("".join(lines).encode("utf-8"))


# --- Github: the standard library -------------------------------------------------------


def _stdlib_sources(root: str, max_bytes: int) -> list[_Source]:
    """Every UTF-8 ``.py`` file (and ``.py`` wheel member) below root, in path order."""
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            name = os.path.relpath(path, root).replace(os.sep, "/")
            if filename.endswith(".py") and os.path.getsize(path) <= max_bytes:
                with open(path, "rb") as f:
                    sources.extend(_decoded(name, f.read()))
            elif filename.endswith(".whl"):
                sources.extend(_wheel_sources(path, name, max_bytes))
    return sources


def _wheel_sources(path: str, name: str, max_bytes: int) -> Iterator[_Source]:
    with zipfile.ZipFile(path) as wheel:
        for info in sorted(wheel.infolist(), key=lambda i: i.filename):
            if info.filename.endswith(".py") and info.file_size <= max_bytes:
                yield from _decoded(f"{name}/{info.filename}", wheel.read(info))


def _decoded(name: str, data: bytes) -> Iterator[_Source]:
    """The file as text, unless it is not UTF-8 (encoding tests) or holds nothing."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text.strip() and "\x00" not in text:
        yield _Source(name, text)


def _select_github(sources: list[_Source], budget: int, config: DemoCorpusConfig) -> list[_Unit]:
    """Files in a seeded order keyed by content, so identical copies (vendored packages,
    stub ``__init__`` files) sit side by side and are kept or left out together; every
    document that still fits the budget is kept."""

    def order(source: _Source) -> tuple[str, str]:
        content = hashlib.sha256(source.text.encode("utf-8")).hexdigest()
        return _hash(f"{config.seed}/order/{content}"), source.name

    units = []
    left = budget
    for source in sorted(sources, key=order):
        code = _Doc(source.text, GITHUB)
        if code.size > left:
            continue
        docs = [code]
        left -= code.size
        docstrings = _docstring_document(source) if config.docstrings else None
        if docstrings is not None and docstrings.size <= left:
            docs.append(docstrings)
            left -= docstrings.size
        units.append(_Unit(source.name, tuple(docs)))
    return units


def _docstring_document(source: _Source) -> _Doc | None:
    """The file's docstrings, each under the dotted name of what it documents, as pydoc
    lays them out; None when the file does not parse (Python 2 test data) or has none."""
    module = source.name.split(".whl/", 1)[-1].removesuffix(".py").removesuffix("/__init__")
    module = module.replace("/", ".")
    try:
        # Old test files hold invalid escape sequences; their warnings are noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source.text)
    except (SyntaxError, ValueError, RecursionError):
        return None
    entries = []
    for qualname, doc in _docstrings(tree, module):
        body = "\n".join(f"    {line}" if line else "" for line in doc.splitlines())
        entries.append(f"{qualname}\n{body}\n")
    if not entries:
        return None
    return _Doc(f"Help on module {module}:\n\n" + "\n".join(entries), GITHUB)


def _docstrings(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _docstrings(child, f"{qualname}.{child.name}")


# --- Splits and deliberate copies -------------------------------------------------------


def _assign_splits(
    units: list[_Unit], config: DemoCorpusConfig
) -> tuple[list[_Doc], list[_Doc], list[_Doc]]:
    """Train, val and test documents: units in a seeded order by key, the first ones held
    out, so each held-out split gets its share of every component (and at least one)."""
    ordered = sorted(units, key=lambda u: _hash(f"{config.seed}/split/{u.key}"))
    n_val = _quota(len(ordered), config.val_fraction)
    n_test = _quota(len(ordered), config.test_fraction)
    if n_val + n_test >= len(ordered):
        raise ValueError(
            f"only {len(ordered)} units of a component: raise max_text_mb or math_documents"
        )

    def docs(part: list[_Unit]) -> list[_Doc]:
        return [doc for unit in part for doc in unit.docs]

    return (
        docs(ordered[n_val + n_test :]),
        docs(ordered[:n_val]),
        docs(ordered[n_val : n_val + n_test]),
    )


def _quota(n: int, fraction: float) -> int:
    return max(1, round(n * fraction)) if fraction > 0 else 0


def _copies(
    train: list[_Doc], held_out: list[_Doc], config: DemoCorpusConfig, rng: random.Random
) -> list[_Doc]:
    """The deliberate duplicates to add to train: exact copies, one-line edits of Github
    files, and leaked held-out documents."""

    def small(docs: list[_Doc]) -> list[_Doc]:
        return [d for d in docs if d.size <= _COPY_MAX_BYTES - len(_EDIT_MARK)]

    def sample(docs: list[_Doc], k: int) -> list[_Doc]:
        return rng.sample(docs, min(k, len(docs)))

    editable = [
        d
        for d in small(train)
        if d.component == GITHUB and len(d.text.splitlines()) >= _NEAR_DUPLICATE_MIN_LINES
    ]
    exact = sample(small(train), config.exact_duplicates)
    near = [_edit_line(d, rng) for d in sample(editable, config.near_duplicates)]
    leaked = sample(small(held_out), config.contaminated_documents)
    return exact + near + leaked


def _edit_line(doc: _Doc, rng: random.Random) -> _Doc:
    """The document with one non-blank line changed (a trailing comment added)."""
    lines = doc.text.split("\n")
    index = rng.choice([i for i, line in enumerate(lines) if line.strip()])
    lines[index] += _EDIT_MARK
    return _Doc("\n".join(lines), doc.component)


# --- DM Mathematics ---------------------------------------------------------------------


def _math_documents(config: DemoCorpusConfig) -> list[_Doc]:
    """Documents of one question kind each, kinds in turn: question line, answer line."""
    rng = random.Random(f"{config.seed}/math")
    docs = []
    for i in range(config.math_documents):
        question = _QUESTION_KINDS[i % len(_QUESTION_KINDS)]
        pairs = (question(rng) for _ in range(config.questions_per_math_document))
        docs.append(_Doc("".join(f"{q}\n{a}\n" for q, a in pairs), MATH))
    return docs


def _fmt(x: Decimal) -> str:
    """A number as DM writes it: no exponent, no trailing zeros, no negative zero."""
    return "0" if x == 0 else format(x.normalize(), "f")


def _operand(rng: random.Random) -> Decimal:
    """Mostly two-digit integers (learnable), some larger ones and some decimals."""
    kind = rng.random()
    if kind < 0.6:
        return Decimal(rng.randint(-99, 99))
    if kind < 0.8:
        return Decimal(rng.randint(-9999, 9999))
    return Decimal(rng.randint(-99999, 99999)).scaleb(-rng.randint(1, 3))


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    template = rng.choice(
        ["What is {a} plus {b}?", "Add {a} and {b}.", "Sum {a} and {b}.", "Calculate {a} + {b}."]
    )
    return template.format(a=_fmt(a), b=_fmt(b)), _fmt(a + b)


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    template = rng.choice(
        [
            "What is {a} take away {b}?",
            "What is {a} minus {b}?",
            "Subtract {b} from {a}.",
            "Calculate {a} - {b}.",
        ]
    )
    return template.format(a=_fmt(a), b=_fmt(b)), _fmt(a - b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), Decimal(rng.randint(-12, 12))
    if rng.random() < 0.5:
        a, b = b, a
    template = rng.choice(
        [
            "What is {a} times {b}?",
            "Multiply {a} and {b}.",
            "What is the product of {a} and {b}?",
            "Calculate {a}*{b}.",
        ]
    )
    return template.format(a=_fmt(a), b=_fmt(b)), _fmt(a * b)


_EXPRESSIONS: tuple[tuple[str, Callable[[int, int, int], int]], ...] = (
    ("{a} + {b} - {c}", lambda a, b, c: a + b - c),
    ("{a} - ({b} + {c})", lambda a, b, c: a - (b + c)),
    ("({a} - {b})*{c}", lambda a, b, c: (a - b) * c),
    ("{a}*{b} + {c}", lambda a, b, c: a * b + c),
    ("{a} + {b}*{c}", lambda a, b, c: a + b * c),
)


def _evaluation(rng: random.Random) -> tuple[str, str]:
    a, b, c = (rng.randint(-20, 20) for _ in range(3))
    expression, value = rng.choice(_EXPRESSIONS)
    template = rng.choice(["What is the value of {e}?", "Evaluate {e}.", "What is {e}?"])
    return template.format(e=expression.format(a=a, b=b, c=c)), str(value(a, b, c))


def _linear_equation(rng: random.Random) -> tuple[str, str]:
    """``Solve a*x + b = c for x.`` with an integer solution."""
    variable = rng.choice("abcdfghjklmnpqrstuvwxyz")
    a = rng.choice([n for n in range(-9, 10) if n != 0])
    x, b = rng.randint(-10, 10), rng.randint(-20, 20)
    term = {1: variable, -1: f"-{variable}"}.get(a, f"{a}*{variable}")
    side = term if b == 0 else f"{term} {'+' if b > 0 else '-'} {abs(b)}"
    c = a * x + b
    equation = f"{side} = {c}" if rng.random() < 0.5 else f"{c} = {side}"
    return f"Solve {equation} for {variable}.", str(x)


_QUESTION_KINDS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _addition,
    _subtraction,
    _multiplication,
    _evaluation,
    _linear_equation,
)
