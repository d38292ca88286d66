"""The "Github" component: source files of this Python installation's standard library (and
the ``.py`` members of the wheels it bundles for ``ensurepip``), each with a second document
holding its docstrings."""

from __future__ import annotations

import ast
import hashlib
import os
import warnings
import zipfile
from collections.abc import Iterator

from stages.demo_corpus.config import DemoCorpusConfig
from stages.demo_corpus.documents import GITHUB, Doc, Source, Unit, content_hash

_SKIPPED_DIRS = frozenset({"site-packages", "__pycache__"})


def stdlib_sources(root: str, max_bytes: int) -> list[Source]:
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


def _wheel_sources(path: str, name: str, max_bytes: int) -> Iterator[Source]:
    with zipfile.ZipFile(path) as wheel:
        for info in sorted(wheel.infolist(), key=lambda i: i.filename):
            if info.filename.endswith(".py") and info.file_size <= max_bytes:
                yield from _decoded(f"{name}/{info.filename}", wheel.read(info))


def _decoded(name: str, data: bytes) -> Iterator[Source]:
    """The file as text, unless it is not UTF-8 (encoding tests) or holds nothing."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text.strip() and "\x00" not in text:
        yield Source(name, text)


def select_github(sources: list[Source], budget: int, config: DemoCorpusConfig) -> list[Unit]:
    """Files in a seeded order keyed by content, so identical copies (vendored packages,
    stub ``__init__`` files) sit side by side and are kept or left out together; every
    document that still fits the budget is kept."""

    def order(source: Source) -> tuple[str, str]:
        content = hashlib.sha256(source.text.encode("utf-8")).hexdigest()
        return content_hash(f"{config.seed}/order/{content}"), source.name

    units = []
    left = budget
    for source in sorted(sources, key=order):
        code = Doc(source.text, GITHUB)
        if code.size > left:
            continue
        docs = [code]
        left -= code.size
        docstrings = _docstring_document(source) if config.docstrings else None
        if docstrings is not None and docstrings.size <= left:
            docs.append(docstrings)
            left -= docstrings.size
        units.append(Unit(source.name, tuple(docs)))
    return units


def _docstring_document(source: Source) -> Doc | None:
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
    return Doc(f"Help on module {module}:\n\n" + "\n".join(entries), GITHUB)


def _docstrings(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _docstrings(child, f"{qualname}.{child.name}")
