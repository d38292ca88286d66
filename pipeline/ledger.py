"""Units of work with atomic commit, and the ledger a restarted stage resumes from.

A stage splits its work into named units (a file, a shard, a bucket). Each unit writes its
files through ``Ledger.unit(name)``: the files go to temporary names, and when the block
ends without error they are moved into place and a small record
``_meta/units/<name>.json`` (files, sizes, sha256) is written last. That record is the
commit point: a unit without one is redone from scratch, a unit with one is never redone.
One record per unit keeps the ledger append-only and lets parallel workers commit without
contending for a shared file, on local disk and on GCS alike.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline import storage

META_DIR = "_meta"


@dataclass(frozen=True)
class FileRecord:
    path: str
    """Path relative to the stage output directory."""
    size: int
    sha256: str


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True


@dataclass
class UnitWriter:
    """Collects the files of one unit while it is being produced."""

    output: str
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the unit (counts, source URL) kept in its ledger record."""
    _pending: list[tuple[str, str, _HashingWriter]] = field(default_factory=list)

    @contextmanager
    def open(self, relpath: str) -> Iterator[_HashingWriter]:
        """Stream one output file of this unit; it is committed with the unit."""
        final = storage.join(self.output, relpath)
        tmp = storage.temp_name(final)
        try:
            with storage.open_file(tmp, "wb") as raw:
                hashing = _HashingWriter(raw)
                yield hashing
        except BaseException:
            storage.delete(tmp)
            raise
        self._pending.append((relpath, tmp, hashing))

    def _discard(self) -> None:
        for _, tmp, _ in self._pending:
            storage.delete(tmp)


class Ledger:
    """The committed units of one stage output directory."""

    def __init__(self, output: str):
        self.output = output
        self._dir = storage.join(output, META_DIR, "units")

    def _record_uri(self, name: str) -> str:
        return storage.join(self._dir, _safe_name(name) + ".json")

    def is_committed(self, name: str) -> bool:
        return storage.exists(self._record_uri(name))

    def record(self, name: str) -> dict[str, Any]:
        return json.loads(storage.read_text(self._record_uri(name)))

    def records(self) -> list[dict[str, Any]]:
        """Every committed unit's record, sorted by unit name."""
        uris = [u for u in storage.list_files(self._dir) if u.endswith(".json")]
        records = [json.loads(storage.read_text(u)) for u in uris]
        return sorted(records, key=lambda r: r["name"])

    @contextmanager
    def unit(self, name: str) -> Iterator[UnitWriter]:
        """Produce unit ``name``; its files and record are committed only on success."""
        unit = UnitWriter(self.output, name)
        try:
            yield unit
        except BaseException:
            unit._discard()
            raise
        files = []
        for relpath, tmp, hashing in unit._pending:
            storage.commit(tmp, storage.join(self.output, relpath))
            files.append(FileRecord(relpath, hashing.size, hashing.sha256.hexdigest()))
        record = {
            "name": name,
            "files": [f.__dict__ for f in sorted(files, key=lambda f: f.path)],
            "metadata": unit.metadata,
            "committed_at": time.time(),
        }
        storage.write_atomic(self._record_uri(name), json.dumps(record, indent=1).encode())

    def commit_file(self, name: str, relpath: str, data: bytes) -> None:
        """Commit unit ``name`` made of one file, ``relpath``, holding ``data``."""
        with self.unit(name) as unit, unit.open(relpath) as f:
            f.write(data)

    def commit_json(self, name: str, relpath: str, payload: Any, sort_keys: bool = False) -> None:
        """Commit unit ``name`` made of one JSON file, ``relpath`` (indented, one space)."""
        self.commit_file(name, relpath, json.dumps(payload, indent=1, sort_keys=sort_keys).encode())

    def read_json(self, relpath: str) -> Any:
        """A committed JSON file of this output, by its path relative to the output."""
        return json.loads(storage.read_text(storage.join(self.output, relpath)))

    def digest(self) -> str:
        """A content digest of every committed file (names, sizes, sha256), order-free."""
        files = sorted(
            (f["path"], f["size"], f["sha256"]) for r in self.records() for f in r["files"]
        )
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _safe_name(name: str) -> str:
    """A unit name as one file name: path separators are kept readable but flattened."""
    return name.replace("/", "__")
