"""Raw document files, as the download stage checks them and dedup reads them: the formats
(JSON lines, plain or zstd- or gzip-compressed, and Parquet) and where a record keeps its
document, the text and the component name at dotted paths (``meta.pile_set_name`` reaches
into a nested JSON object or Parquet struct column), with a constant component for data
that has none. Imported by stage configs, so it stays free of I/O libraries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIX = ".parquet"
INPUT_SUFFIXES = (*JSON_LINES_SUFFIXES, PARQUET_SUFFIX)
"""The document files meshline reads (Dolma's ``.json.gz`` holds JSON lines)."""

_MISSING = object()


@dataclass(frozen=True)
class Document:
    text: str
    pile_set_name: str
    """The document's component (the Pile's ``pile_set_name``, whatever field held it)."""


@dataclass(frozen=True)
class Malformed:
    reason: str


def _lookup(record: Any, path: str) -> Any:
    """The value at dotted ``path`` in nested dicts, ``_MISSING`` where the path breaks off."""
    for key in path.split("."):
        if not isinstance(record, dict) or key not in record:
            return _MISSING
        record = record[key]
    return record


def record_word(name: str) -> str:
    """What one record of file ``name`` is called in messages: a row or a line."""
    return "row" if name.endswith(PARQUET_SUFFIX) else "line"


class DocumentFields(BaseModel):
    """Where the records of a corpus keep each document (a stage config's ``documents``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_field: str = "text"
    """Dotted path of each record's text (a JSON key, or a Parquet column)."""
    component_field: str | None = "meta.pile_set_name"
    """Dotted path of each record's component name (the Pile: ``meta.pile_set_name``;
    SlimPajama: ``meta.redpajama_set_name``); null: every document is in ``component``."""
    component: str | None = None
    """The component of documents whose record has none at ``component_field`` (null:
    such a record is malformed)."""

    @model_validator(mode="after")
    def _has_component(self) -> DocumentFields:
        if self.component_field is None and self.component is None:
            raise ValueError("give component_field, component (a constant name), or both")
        return self

    def columns(self) -> list[str]:
        """The top-level fields (Parquet columns) a record needs."""
        paths = [self.text_field] + ([self.component_field] if self.component_field else [])
        return list(dict.fromkeys(p.split(".")[0] for p in paths))

    def required_columns(self) -> list[str]:
        """The top-level columns a Parquet file must have."""
        return self.columns() if self.component is None else [self.text_field.split(".")[0]]

    def document(self, record: Any) -> Document | Malformed:
        """``record`` (a parsed JSON line or a Parquet row) as a document, or why not."""
        if not isinstance(record, dict):
            return Malformed("not a JSON object")
        text = _lookup(record, self.text_field)
        if not isinstance(text, str):
            missing = text is _MISSING or text is None
            path = self.text_field
            return Malformed(f"missing {path}" if missing else f"{path} is not a string")
        name = _lookup(record, self.component_field) if self.component_field else _MISSING
        if (name is _MISSING or name is None) and self.component is not None:
            name = self.component
        if not isinstance(name, str):
            return Malformed(f"{self.component_field} missing or not a string")
        try:
            # JSON may escape lone surrogates, which no UTF-8 output (Parquet) can hold.
            text.encode("utf-8")
        except UnicodeEncodeError:
            return Malformed(f"{self.text_field} holds a lone surrogate (not valid Unicode)")
        return Document(text, name)
