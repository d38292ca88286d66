"""The download stage's config, and the error it raises for a file it could not fetch."""

from __future__ import annotations

from pydantic import Field

from pipeline.stage import StageConfig
from stages.documents import DocumentFields

MIRROR_STAGE = "demo_corpus"
"""An upstream stage whose output is a mirror (files plus ``SHA256SUMS.txt``) to download."""


class DownloadConfig(StageConfig):
    """Which files to fetch, from where, how they are verified, and how hard to try."""

    sources: list[str] = []
    """Files to fetch: URLs (``https://``, ``http://``, ``gs://``, ``file://``,
    ``hf://datasets/OWNER/NAME[@REVISION]/PATH``) or local paths; ``gs://``, ``hf://`` and
    local entries may be globs (``*``, ``?``, ``[``). A relative entry without a scheme is
    joined to ``base_url`` when one is given. Empty when the pipeline has a ``demo_corpus``
    stage, whose mirror is downloaded instead."""
    base_url: str | None = None
    """Mirror root that relative sources and a relative ``checksums`` URL are joined to; output
    names are paths relative to it (for ``hf://``, a file's path in the repo otherwise)."""
    checksums: str | dict[str, str] | None = None
    """Expected sha256 of every file: a ``SHA256SUMS``-style file or an earlier download's
    ``manifest.json`` (URL or path; relative is joined to ``base_url``), or an inline mapping
    name -> sha256. Names are paths relative to ``base_url``, or basenames. When given,
    every source must be listed."""
    concurrency: int = Field(default=4, ge=1)
    """Files fetched at the same time (one Ray task each)."""
    retries: int = Field(default=5, ge=0)
    """Times a failing request is retried (5xx, 429, timeouts, dropped connections) before the
    file fails; the count starts again whenever bytes arrive."""
    backoff_seconds: float = Field(default=1.0, ge=0)
    """Wait before the first retry; doubled for each further retry (up to 5 minutes)."""
    timeout_seconds: float = Field(default=60.0, gt=0)
    """Seconds to wait for a connection or for the next bytes before a request fails."""
    chunk_mb: float = Field(default=8.0, gt=0)
    """Size of the chunks streamed from the source to the output, in MiB."""
    shared_filesystem: bool = False
    """A local output directory is visible to every node (NFS, or a fake multi-node cluster
    on one machine), so any node may fetch; otherwise fetches run on the stage's node."""
    verify: bool = True
    """Fail a ``.zst``/``.gz`` file that does not decompress whole, a JSON-lines file
    (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, ``.json.gz``) whose first line lacks the
    ``documents`` fields, and a ``.parquet`` file without their columns."""
    hf_endpoint: str | None = None
    """The Hugging Face hub ``hf://`` sources are read from (a mirror of it, or a hub of your
    own); default ``HF_ENDPOINT`` where the stage runs, else https://huggingface.co. The
    token is ``HF_TOKEN`` (or ``hf auth login``'s) where the stage runs, never a setting."""
    documents: DocumentFields = DocumentFields()
    """Where each record keeps its text and component, as ``verify`` checks (the Pile's
    ``{"text": str, "meta": {"pile_set_name": str}}`` by default)."""

    volatile_fields = frozenset(
        {
            "concurrency",
            "retries",
            "backoff_seconds",
            "timeout_seconds",
            "chunk_mb",
            "shared_filesystem",
            # Where the hub is, not what it holds: files are pinned by commit and sha256.
            "hf_endpoint",
        }
    )

    def check_inputs(self, inputs: tuple[str, ...]) -> None:
        if MIRROR_STAGE in inputs:
            if self.sources or self.base_url or self.checksums:
                raise ValueError(f"a {MIRROR_STAGE} stage excludes sources, base_url and checksums")
        elif not self.sources:
            raise ValueError(f"give sources (or configure a {MIRROR_STAGE} stage)")

    @property
    def chunk_bytes(self) -> int:
        return max(1, int(self.chunk_mb * 2**20))


class DownloadError(Exception):
    """A file could not be fetched or failed verification; the message names it."""
