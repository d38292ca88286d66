"""The download stage's ``manifest.json``: name, size, sha256 and source of every file,
committed as the stage's last unit; what downstream stages read to find the files."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.ledger import Ledger

MANIFEST_UNIT = "manifest"
MANIFEST_FILE = "manifest.json"


def write_manifest(ledger: Ledger, names: list[str]) -> list[dict[str, Any]]:
    """Commit the manifest of the files ``names`` (each committed as its own unit, the
    source in its record); returns its entries, sorted by name."""
    files = []
    for name in sorted(names):
        record = ledger.record(name)
        (entry,) = record["files"]
        files.append(
            {
                "name": name,
                "size": entry["size"],
                "sha256": entry["sha256"],
                "source": record["metadata"]["source"],
            }
        )
    ledger.commit_json(MANIFEST_UNIT, MANIFEST_FILE, {"files": files})
    return files


def read_manifest(download_output: str) -> list[dict[str, Any]]:
    """The entries of a finished download output's manifest."""
    return Ledger(download_output).read_json(MANIFEST_FILE)["files"]


def downloaded_files(download_output: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, uri) of every downloaded file whose name ends with one of ``suffixes``, sorted
    by name."""
    names = sorted(
        f["name"] for f in read_manifest(download_output) if f["name"].endswith(suffixes)
    )
    return [(name, storage.join(download_output, name)) for name in names]
