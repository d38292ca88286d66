"""What the demo corpus is made of: documents, the units that go to a split together, and
the two components' names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

GITHUB = "Github"
MATH = "DM Mathematics"


@dataclass(frozen=True)
class Doc:
    text: str
    component: str

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class Unit:
    """Documents that go to the same split together (a file and its docstrings)."""

    key: str
    docs: tuple[Doc, ...]


@dataclass(frozen=True)
class Source:
    name: str
    """Path relative to the stdlib root; a wheel member is ``<wheel path>/<member>``."""
    text: str


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
