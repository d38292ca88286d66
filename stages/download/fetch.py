"""Fetching files into the stage output: one Ray task per file, each file one ledger unit
committed only once its size, sha256 and document format are checked."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import requests
from ray.exceptions import RayError, RayTaskError

from pipeline.ledger import Ledger
from pipeline.secrets import redact_url, scrub
from pipeline.tasks import Placement, run_tasks
from stages.download.config import DownloadConfig, DownloadError
from stages.download.hub import token_session
from stages.download.sources import FileItem
from stages.download.transfer import RangeIgnored, chunks
from stages.download.verify import DocumentCheck

log = logging.getLogger("meshline.download")

TASK_CPUS = 0.25
"""A download waits on the network far more than it computes."""


class _ChecksumMismatch(DownloadError):
    """The bytes arrived whole but hash to something other than the published digest, or
    their count is not the published size."""


@dataclass(frozen=True)
class Fetched:
    """What a finished download task reports back."""

    name: str
    size: int
    sha256: str


def _stream_into(out: IO[bytes], body: Iterator[bytes], check: DocumentCheck | None) -> None:
    for chunk in body:
        out.write(chunk)
        if check is not None:
            check.feed(chunk)


def _attempt(
    ledger: Ledger, item: FileItem, config: DownloadConfig, session: requests.Session
) -> Fetched:
    """Fetch ``item`` once into its unit; the unit commits only if every check passes."""
    check = None
    if config.verify and DocumentCheck.applies_to(item.name):
        check = DocumentCheck(item.name, config.documents)
    with ledger.unit(item.name) as unit:
        with unit.open(item.name) as out:
            _stream_into(out, chunks(item.url, config, session), check)
        sha256 = out.sha256.hexdigest()
        if item.size is not None and out.size != item.size:
            raise _ChecksumMismatch(
                f"{item.name}: size mismatch, expected {item.size} bytes, got {out.size} "
                f"from {redact_url(item.url)}"
            )
        if item.sha256 is not None and sha256 != item.sha256:
            raise _ChecksumMismatch(
                f"{item.name}: sha256 mismatch, expected {item.sha256}, got {sha256} "
                f"({out.size} bytes from {redact_url(item.url)})"
            )
        if check is not None:
            check.finish()
        unit.metadata.update(source=item.source, size=out.size, sha256=sha256)
    return Fetched(item.name, out.size, sha256)


def download_file(
    output: str, item: FileItem, config: DownloadConfig, hub_token: str | None
) -> Fetched:
    """Fetch one file into its ledger unit under ``output``, showing ``hub_token`` (given
    for a hub file) to its server. A checksum mismatch is retried once from scratch, as is
    a resume the server answers with the whole file."""
    ledger = Ledger(output)
    session = token_session(hub_token)
    mismatches = restarts = 0
    while True:
        try:
            return _attempt(ledger, item, config, session)
        except _ChecksumMismatch as exc:
            mismatches += 1
            if mismatches > 1:
                raise DownloadError(str(exc)) from None
            log.warning("%s; downloading it again", exc)
        except RangeIgnored:
            restarts += 1
            if restarts > config.retries:
                raise DownloadError(
                    f"{redact_url(item.url)}: server does not honour Range; gave up after "
                    f"{restarts} restarts"
                ) from None
            log.warning("%s: server ignored Range; restarting from 0", redact_url(item.url))


def _failure_message(item: FileItem, error: RayError) -> str:
    """Why ``item``'s task failed, naming the file and without the URL's secrets."""
    cause = error.cause if isinstance(error, RayTaskError) else None
    if isinstance(cause, DownloadError):
        return str(cause)
    return scrub(f"{item.name}: {type(cause or error).__name__}: {cause or error}", item.url)


def fetch_all(
    output: str, items: list[FileItem], config: DownloadConfig, hub_token: str | None
) -> tuple[list[Fetched], dict[str, str]]:
    """One Ray task per item, at most ``concurrency`` at a time, pinned to this node when the
    output is on its local disk; a failure does not stop the others. Returns what was fetched
    and the failures (name -> message)."""
    fetched: list[Fetched] = []
    failed: dict[str, str] = {}
    outcomes = run_tasks(
        download_file,
        [(output, item, config, hub_token if item.hub else None) for item in items],
        concurrency=config.concurrency,
        desc="download",
        unit="file",
        num_cpus=TASK_CPUS,
        placement=Placement.for_output(output, config.shared_filesystem),
        postfix=lambda done: f"{sum(f.size for f in done) / 1e6:.1f} MB",
    )
    for outcome in outcomes:
        item = items[outcome.index]
        if outcome.error is not None:
            failed[item.name] = _failure_message(item, outcome.error)
            log.error("failed %s", failed[item.name])
            continue
        result: Fetched = outcome.result
        fetched.append(result)
        log.info(
            "downloaded %s (%.1f MB, sha256 %s)", result.name, result.size / 1e6, result.sha256
        )
    return fetched, failed
