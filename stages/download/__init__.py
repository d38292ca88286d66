"""The download stage: fetches a corpus's files (the Pile or any mirror of it, or other
document files) into the stage output.

Each file is one ledger unit, fetched by its own Ray task with at most ``concurrency`` in
flight. Bytes are streamed in chunks straight into the unit's temporary file while their
size, sha256 and (for document files) compression and first record are checked, so a file is
committed only once it is known to be exactly what was published. HTTP downloads resume
with ``Range`` (after the last whole chunk) when a connection drops, and retry transient
failures with exponential backoff; ``gs://``, ``file://`` and local sources are streamed
through ``pipeline.storage``.

Output: ``{output}/{name}`` for every file, where ``name`` is the file's path relative to
``base_url`` (or to a glob's fixed prefix, or its basename), plus ``manifest.json`` listing
name, size, sha256 and source of every file, written as the last unit.

- ``config``: ``DownloadConfig`` and ``DownloadError``.
- ``sources``: sources and globs resolved to output names, checksums looked up.
- ``transfer``: the bytes of a URL (HTTP with Range and retries, ``gs://``, local).
- ``verify``: ``DocumentCheck``, compression and the first record checked as bytes stream
  past.
- ``fetch``: one Ray task per file, each file one ledger unit.
- ``manifest``: ``manifest.json``, written last; ``downloaded_files`` for downstream stages.
- ``stage``: the registered stage.
"""

from pipeline.secrets import redact_url
from stages.download.config import DownloadConfig, DownloadError
from stages.download.sources import parse_checksums, resolve_sources
from stages.download.stage import run
from stages.download.verify import DocumentCheck

__all__ = [
    "DocumentCheck",
    "DownloadConfig",
    "DownloadError",
    "parse_checksums",
    "redact_url",
    "resolve_sources",
    "run",
]
