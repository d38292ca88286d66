"""The download stage: fetches the Pile's files (or any mirror of them) into the stage output.

Each file is one ledger unit, fetched by its own Ray task with at most ``concurrency`` in
flight. Bytes are streamed in chunks straight into the unit's temporary file while their
size, sha256 and (for Pile files) zstd framing and first line are checked, so a file is
committed only once it is known to be exactly what was published. HTTP downloads resume
with ``Range`` (after the last whole chunk) when a connection drops, and retry transient
failures with exponential backoff; ``gs://``, ``file://`` and local sources are streamed
through ``pipeline.storage``.

Output: ``{output}/{name}`` for every file, where ``name`` is the file's path relative to
``base_url`` (or to a glob's fixed prefix, or its basename), plus ``manifest.json`` listing
name, size, sha256 and source of every file, written as the last unit.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import ray
import requests
import zstandard
from google.api_core.exceptions import GoogleAPIError
from pydantic import Field, model_validator
from ray.exceptions import RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from pipeline import storage
from pipeline.ledger import Ledger
from pipeline.stage import Source, StageConfig, StageContext, fingerprint, register
from stages.demo_corpus import CHECKSUMS, DemoCorpusConfig, build_demo_corpus

log = logging.getLogger("meshline.download")

MANIFEST_UNIT = "manifest"
MANIFEST_FILE = "manifest.json"
HTTP_SCHEMES = ("http://", "https://")
# Statuses worth asking again; every other 4xx means the request itself is wrong.
RETRYABLE_STATUSES = frozenset({408, 429})
# A Pile document can be long, but a first line beyond this is not a Pile file.
MAX_FIRST_LINE_BYTES = 64 * 2**20
# Compressed bytes handed to the zstd decoder at a time, so one call's output stays small.
ZSTD_FEED_BYTES = 256 * 2**10
REDACTED = "<redacted>"
# However many retries are configured, a mirror is asked again at least this often.
MAX_BACKOFF_SECONDS = 300.0


class DownloadConfig(StageConfig):
    """Which files to fetch, from where, how they are verified, and how hard to try."""

    sources: list[str] = []
    """Files to fetch: URLs (``https://``, ``http://``, ``gs://``, ``file://``) or local
    paths; ``gs://`` and local entries may be globs (``*``, ``?``, ``[``). A relative entry
    without a scheme is joined to ``base_url`` when one is given."""
    base_url: str | None = None
    """Mirror root that relative sources and a relative ``checksums`` URL are joined to; output
    names are paths relative to it."""
    checksums: str | dict[str, str] | None = None
    """Expected sha256 of every file: a ``SHA256SUMS``-style file (URL or path; relative is
    joined to ``base_url``) or an inline mapping name -> sha256. Names are paths relative to
    ``base_url``, or basenames. When given, every source must be listed."""
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
    verify_pile: bool = True
    """Fail a ``.zst`` file that is not valid zstd, and a ``.jsonl``/``.jsonl.zst`` file whose
    first line is not Pile JSON (``{"text": str, "meta": {"pile_set_name": str}}``)."""
    demo_corpus: DemoCorpusConfig | None = None
    """Build the offline demo corpus under ``{pipeline_root}/demo-mirror-{hash}`` and download every
    file its SHA256SUMS.txt lists from there; excludes sources, base_url and checksums."""

    volatile_fields = frozenset(
        {"concurrency", "retries", "backoff_seconds", "timeout_seconds", "chunk_mb"}
    )

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DownloadConfig:
        if self.demo_corpus is not None:
            if self.sources or self.base_url or self.checksums:
                raise ValueError("demo_corpus excludes sources, base_url and checksums")
        elif not self.sources:
            raise ValueError("give sources (or demo_corpus)")
        return self

    @property
    def chunk_bytes(self) -> int:
        return max(1, int(self.chunk_mb * 2**20))


class DownloadError(Exception):
    """A file could not be fetched or failed verification; the message names it."""


class _ChecksumMismatch(DownloadError):
    """The bytes arrived whole but hash to something other than the published digest."""


class _RangeIgnored(Exception):
    """The server answered a resume request with the whole file (or a different range)."""


class _Transient(Exception):
    """A response worth retrying (5xx, 429, a short body)."""


@dataclass(frozen=True)
class FileItem:
    """One file to fetch: its output name (also its unit name), where it is, what it hashes to."""

    name: str
    url: str
    sha256: str | None


@dataclass(frozen=True)
class Fetched:
    """What a finished download task reports back."""

    name: str
    size: int
    sha256: str
    source: str


def redact_url(url: str) -> str:
    """``url`` without credentials: userinfo and query string (signed-URL tokens) replaced."""
    parts = urlsplit(url)
    if not parts.scheme or parts.scheme == "file":
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _scrub(text: str, url: str) -> str:
    """``text`` (a library's error message) with every secret part of ``url`` replaced, and
    any query string or userinfo in it too (a redirect may have led to a signed URL)."""
    parts = urlsplit(url)
    secrets = [parts.query, unquote(parts.query), parts.password, parts.username]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = re.sub(r"\?[^\s'\")]+", f"?{REDACTED}", text)
    return re.sub(r"://[^/\s@]+@", f"://{REDACTED}@", text)


def _is_http(url: str) -> bool:
    return url.startswith(HTTP_SCHEMES)


def _is_glob(source: str) -> bool:
    # An HTTP server cannot be listed, and "?" there starts a query string.
    return not _is_http(source) and any(c in source for c in "*?[")


def _normalise(location: str) -> str:
    """A URL as given, or a local path / ``file://`` URI as an absolute path (Ray workers
    may run in another working directory)."""
    if _is_http(location) or storage.is_gcs(location):
        return location
    return storage.absolute(location)


def join_url(base: str, relative: str) -> str:
    """``relative`` under ``base``, keeping a query string of an HTTP base (a token)."""
    if not _is_http(base):
        return storage.join(_normalise(base), relative)
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + "/" + relative.lstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _basename(url: str) -> str:
    return posixpath.basename(unquote(urlsplit(url).path) if _is_http(url) else url)


def _prefix(base: str) -> str:
    """What every location under ``base`` starts with."""
    base = _normalise(base)
    if _is_http(base):
        parts = urlsplit(base)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
    return base.rstrip("/") + "/"


def _name_under(url: str, base: str | None) -> str | None:
    """``url``'s path relative to ``base``, or None when it is not below it."""
    if base is None:
        return None
    prefix = _prefix(base)
    location = url
    if _is_http(url):
        parts = urlsplit(url)
        location = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    if not location.startswith(prefix):
        return None
    return unquote(location[len(prefix) :]) if _is_http(url) else location[len(prefix) :]


def resolve_sources(sources: list[str], base_url: str | None) -> list[tuple[str, str]]:
    """Every (output name, location) the sources stand for, globs expanded, in order."""
    resolved: list[tuple[str, str]] = []
    for source in sources:
        absolute = "://" in source or os.path.isabs(source)
        if absolute or base_url is None:
            location = _normalise(source)
        else:
            location = join_url(base_url, source)
        if not _is_glob(location):
            name = _name_under(location, base_url) or _basename(location)
            resolved.append((name, location))
            continue
        matches = storage.glob(location)
        if not matches:
            raise DownloadError(f"no files match {redact_url(source)}")
        fixed = location[: min(location.index(c) for c in "*?[" if c in location)]
        glob_root = fixed.rsplit("/", 1)[0]
        for match in matches:
            name = _name_under(match, base_url) or _name_under(match, glob_root)
            resolved.append((name or _basename(match), match))
    return resolved


def parse_checksums(text: str) -> dict[str, str]:
    """A ``SHA256SUMS`` file (``<hex>  <name>`` or ``<hex> *<name>`` lines) as name -> hex."""
    sums = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        sums[name.removeprefix("./")] = digest.lower()
    return sums


def _expected_sha256(name: str, sums: dict[str, str]) -> str | None:
    """The digest listed for ``name``, or for its basename when that is listed only once."""
    if name in sums:
        return sums[name]
    base = posixpath.basename(name)
    candidates = [digest for listed, digest in sums.items() if posixpath.basename(listed) == base]
    return candidates[0] if len(candidates) == 1 else None


def plan_files(
    sources: list[str],
    base_url: str | None,
    sums: dict[str, str] | None,
) -> list[FileItem]:
    """The files to fetch with their expected digests; names must be unique, relative paths
    and (when checksums are given) listed in them."""
    items = []
    seen: set[str] = set()
    for name, url in resolve_sources(sources, base_url):
        if name in seen or name == MANIFEST_FILE:
            raise DownloadError(f"two sources, or a source and the manifest, share name {name}")
        if os.path.isabs(name) or ".." in name.split("/") or not name:
            raise DownloadError(f"cannot place {redact_url(url)} under the output (name {name!r})")
        seen.add(name)
        expected = None
        if sums is not None:
            expected = _expected_sha256(name, sums)
            if expected is None:
                raise DownloadError(f"no checksum listed for {name}")
        items.append(FileItem(name, url, expected))
    return items


def _load_checksums(
    checksums: str | dict[str, str] | None, base_url: str | None, config: DownloadConfig
) -> dict[str, str] | None:
    if checksums is None:
        return None
    if isinstance(checksums, dict):
        return {name.removeprefix("./"): digest.lower() for name, digest in checksums.items()}
    absolute = "://" in checksums or os.path.isabs(checksums)
    location = checksums if absolute or base_url is None else join_url(base_url, checksums)
    return parse_checksums(b"".join(_chunks(_normalise(location), config)).decode("utf-8"))


def _content_range_start_total(response: requests.Response) -> tuple[int, int | None] | None:
    """(first byte, total size or None) of a ``Content-Range: bytes A-B/T`` header."""
    unit, _, spec = response.headers.get("Content-Range", "").partition(" ")
    span, _, total = spec.partition("/")
    first = span.partition("-")[0]
    if unit != "bytes" or not first.isdigit():
        return None
    return int(first), int(total) if total.isdigit() else None


def _check_status(response: requests.Response, url: str) -> None:
    status = response.status_code
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise _Transient(f"HTTP {status}")
    if status >= 400 and status != 416:
        raise DownloadError(f"{redact_url(url)}: HTTP {status} {response.reason} (not retried)")


def _http_chunks(session: requests.Session, url: str, config: DownloadConfig) -> Iterator[bytes]:
    """The body of ``url``, resuming with ``Range`` where a connection dropped, retrying
    transient failures with backoff; ends only once the declared length has arrived."""
    received = 0
    total: int | None = None
    failures = 0
    while True:
        headers = {"Accept-Encoding": "identity"}
        if received:
            headers["Range"] = f"bytes={received}-"
        try:
            with session.get(
                url, headers=headers, stream=True, timeout=config.timeout_seconds
            ) as response:
                _check_status(response, url)
                if received:
                    span = _content_range_start_total(response)
                    if response.status_code != 206 or span is None or span[0] != received:
                        raise _RangeIgnored
                    total = span[1] if span[1] is not None else total
                elif response.status_code == 200:
                    length = response.headers.get("Content-Length", "")
                    total = int(length) if length.isdigit() else None
                else:
                    raise _Transient(f"HTTP {response.status_code} without a Range request")
                # A chunk cut short by a dropped connection is lost inside urllib3, so a
                # resume starts after the last whole chunk.
                for chunk in response.iter_content(config.chunk_bytes):
                    received += len(chunk)
                    failures = 0
                    yield chunk
            if total is None or received == total:
                return
            if received > total:
                raise DownloadError(
                    f"{redact_url(url)}: got {received} bytes, server declared {total}"
                )
            raise _Transient(f"connection closed after {received} of {total} bytes")
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            _Transient,
        ) as exc:
            failures += 1
            reason = str(exc) if isinstance(exc, _Transient) else f"{type(exc).__name__}: {exc}"
            reason = _scrub(reason, url)
            if failures > config.retries:
                raise DownloadError(
                    f"{redact_url(url)}: failed after {config.retries} retries ({reason})"
                ) from None
            delay = min(MAX_BACKOFF_SECONDS, config.backoff_seconds * 2 ** (failures - 1))
            log.warning(
                "%s: %s; retry %d of %d in %.1f s",
                redact_url(url),
                reason,
                failures,
                config.retries,
                delay,
            )
            time.sleep(delay)


def _storage_chunks(uri: str, chunk_bytes: int) -> Iterator[bytes]:
    """The bytes of a ``gs://`` object or local file, checked against its listed size."""
    try:
        expected = storage.size(uri)
        received = 0
        with storage.open_file(uri, "rb") as f:
            while chunk := f.read(chunk_bytes):
                received += len(chunk)
                yield chunk
    except (OSError, ValueError, GoogleAPIError) as exc:
        raise DownloadError(f"{uri}: {type(exc).__name__}: {exc}") from None
    if received != expected:
        raise DownloadError(f"{uri}: read {received} bytes, its size is {expected}")


def _chunks(
    location: str, config: DownloadConfig, session: requests.Session | None = None
) -> Iterator[bytes]:
    if _is_http(location):
        return _http_chunks(session or requests.Session(), location, config)
    return _storage_chunks(location, config.chunk_bytes)


class PileCheck:
    """Checks a file as its bytes stream past: complete zstd frames (``.zst``) and a Pile
    JSON first line (``.jsonl`` / ``.jsonl.zst``), without holding the file in memory.

    The first problem is kept rather than raised, so that the download still finishes and a
    checksum mismatch (a bad transfer, worth fetching again) can take precedence over it."""

    def __init__(self, name: str):
        self.name = name
        self.problem: str | None = None
        self._zstd = name.endswith(".zst")
        self._jsonl = name.removesuffix(".zst").endswith(".jsonl")
        self._decoder = zstandard.ZstdDecompressor()
        self._frame = self._decoder.decompressobj()
        self._in_frame = False
        self._first_line: bytearray | None = bytearray() if self._jsonl else None

    @staticmethod
    def applies_to(name: str) -> bool:
        return name.endswith((".zst", ".jsonl"))

    def feed(self, data: bytes) -> None:
        if self.problem is not None:
            return
        if not self._zstd:
            self._take(data)
            return
        for start in range(0, len(data), ZSTD_FEED_BYTES):
            self._decode(data[start : start + ZSTD_FEED_BYTES])

    def _decode(self, data: bytes) -> None:
        # One decompressobj decodes one frame; a file may hold several frames in a row.
        while data and self.problem is None:
            try:
                self._take(self._frame.decompress(data))
            except zstandard.ZstdError as exc:
                self.problem = f"not valid zstd ({exc})"
                return
            if not self._frame.eof:
                self._in_frame = True
                return
            data = self._frame.unused_data
            self._frame = self._decoder.decompressobj()
            self._in_frame = False

    def _take(self, text: bytes) -> None:
        if self._first_line is None or not text:
            return
        line, newline, _ = text.partition(b"\n")
        self._first_line += line
        if newline:
            self._check_first_line()
        elif len(self._first_line) > MAX_FIRST_LINE_BYTES:
            self.problem = f"first line is over {MAX_FIRST_LINE_BYTES} bytes"

    def _check_first_line(self) -> None:
        line, self._first_line = bytes(self._first_line or b""), None
        try:
            doc = json.loads(line)
        except ValueError as exc:
            self.problem = f"first line is not Pile JSON ({exc})"
            return
        if not (
            isinstance(doc, dict)
            and isinstance(doc.get("text"), str)
            and isinstance(meta := doc.get("meta"), dict)
            and isinstance(meta.get("pile_set_name"), str)
        ):
            self.problem = (
                'first line is not Pile JSON (needs {"text": str, "meta": {"pile_set_name": str}})'
            )

    def finish(self) -> None:
        """Raise, naming the file, unless all of it was well-formed."""
        if self.problem is None and self._in_frame:
            self.problem = "not valid zstd (truncated frame)"
        if self.problem is None and self._first_line is not None:
            if self._first_line:
                self._check_first_line()
            else:
                self.problem = "empty, no Pile JSON line"
        if self.problem is not None:
            raise DownloadError(f"{self.name}: {self.problem}")


def _stream_into(out: IO[bytes], chunks: Iterator[bytes], check: PileCheck | None) -> None:
    for chunk in chunks:
        out.write(chunk)
        if check is not None:
            check.feed(chunk)


def _attempt(
    ledger: Ledger, item: FileItem, config: DownloadConfig, session: requests.Session
) -> Fetched:
    """Fetch ``item`` once into its unit; the unit commits only if every check passes."""
    source = redact_url(item.url)
    check = PileCheck(item.name) if config.verify_pile and PileCheck.applies_to(item.name) else None
    with ledger.unit(item.name) as unit:
        with unit.open(item.name) as out:
            _stream_into(out, _chunks(item.url, config, session), check)
        sha256 = out.sha256.hexdigest()
        if item.sha256 is not None and sha256 != item.sha256:
            raise _ChecksumMismatch(
                f"{item.name}: sha256 mismatch, expected {item.sha256}, got {sha256} "
                f"({out.size} bytes from {source})"
            )
        if check is not None:
            check.finish()
        unit.metadata.update(source=source, size=out.size, sha256=sha256)
    return Fetched(item.name, out.size, sha256, source)


@ray.remote(num_cpus=0.25)
def download_file(output: str, item: FileItem, config: DownloadConfig) -> Fetched:
    """Fetch one file into its ledger unit under ``output``. A checksum mismatch is retried
    once from scratch, as is a resume the server answers with the whole file."""
    ledger = Ledger(output)
    session = requests.Session()
    mismatches = restarts = 0
    while True:
        try:
            return _attempt(ledger, item, config, session)
        except _ChecksumMismatch as exc:
            mismatches += 1
            if mismatches > 1:
                raise DownloadError(str(exc)) from None
            log.warning("%s; downloading it again", exc)
        except _RangeIgnored:
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
    return _scrub(f"{item.name}: {type(cause or error).__name__}: {cause or error}", item.url)


def fetch_all(
    ledger: Ledger, items: list[FileItem], config: DownloadConfig
) -> tuple[list[Fetched], dict[str, str]]:
    """Run one Ray task per item, at most ``concurrency`` at a time; a failure does not stop
    the others. Returns what was fetched and the failures (name -> message)."""
    fetched: list[Fetched] = []
    failed: dict[str, str] = {}
    waiting = list(items)
    running: dict[ray.ObjectRef, FileItem] = {}
    task = download_file
    if not storage.is_gcs(ledger.output):
        # A local output directory exists only on this node: its units must be written here.
        node = ray.get_runtime_context().get_node_id()
        task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    received = 0
    # One bar, bytes in its postfix: the stage actor's stderr is a log file, where stacked
    # bars turn into cursor-movement noise.
    with tqdm(total=len(items), desc="download", unit="file") as bar:
        while waiting or running:
            while waiting and len(running) < config.concurrency:
                item = waiting.pop(0)
                running[task.remote(ledger.output, item, config)] = item
            done, _ = ray.wait(list(running), num_returns=1)
            item = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except RayError as exc:
                failed[item.name] = _failure_message(item, exc)
                log.error("failed %s", failed[item.name])
            else:
                fetched.append(result)
                log.info(
                    "downloaded %s (%.1f MB, sha256 %s)",
                    result.name,
                    result.size / 1e6,
                    result.sha256,
                )
                received += result.size
                bar.set_postfix_str(f"{received / 1e6:.1f} MB", refresh=False)
            bar.update(1)
    return fetched, failed


def write_manifest(ledger: Ledger, items: list[FileItem]) -> list[dict[str, Any]]:
    """Commit ``manifest.json`` (name, size, sha256, source of every file) as the last unit;
    returns its entries."""
    files = []
    for item in sorted(items, key=lambda i: i.name):
        record = ledger.record(item.name)
        (entry,) = record["files"]
        files.append(
            {
                "name": item.name,
                "size": entry["size"],
                "sha256": entry["sha256"],
                "source": record["metadata"]["source"],
            }
        )
    with ledger.unit(MANIFEST_UNIT) as unit, unit.open(MANIFEST_FILE) as f:
        f.write(json.dumps({"files": files}, indent=1).encode())
    return files


def _log_sources(ctx: StageContext, files: list[dict[str, Any]]) -> None:
    """Every fetched file as an MLflow input dataset: its source URL and sha256."""
    ctx.log_sources([Source(f["name"], f["source"], f["sha256"]) for f in files])


def demo_mirror(pipeline_root: str, corpus: DemoCorpusConfig) -> str:
    """Where the demo corpus is built: one directory per corpus config, since the builder
    reuses whatever matches its own SHA256SUMS.txt."""
    return storage.join(pipeline_root, f"demo-mirror-{fingerprint(corpus, [])}")


def _plan(ctx: StageContext) -> list[FileItem]:
    config: DownloadConfig = ctx.config
    if config.demo_corpus is None:
        sums = _load_checksums(config.checksums, config.base_url, config)
        return plan_files(config.sources, config.base_url, sums)
    mirror = demo_mirror(ctx.pipeline_root, config.demo_corpus)
    build_demo_corpus(mirror, config.demo_corpus)
    sums = parse_checksums(storage.read_text(storage.join(mirror, CHECKSUMS)))
    return plan_files(sorted(sums), mirror, sums)


@register("download", DownloadConfig)
def run(ctx: StageContext) -> None:
    """Fetch every planned file not yet committed, then commit the manifest."""
    config: DownloadConfig = ctx.config
    started = time.monotonic()
    if ctx.ledger.is_committed(MANIFEST_UNIT):
        # Finished before (the process died before the executor saw it): the mirror and the
        # network are not needed again.
        listed = json.loads(storage.read_text(storage.join(ctx.output, MANIFEST_FILE)))["files"]
        log.info("download: all %d files already committed", len(listed))
        _log_sources(ctx, listed)
        ctx.record(files=0, bytes=0, skipped=len(listed), seconds=time.monotonic() - started)
        return
    items = _plan(ctx)
    todo = [item for item in items if not ctx.ledger.is_committed(item.name)]
    skipped = len(items) - len(todo)
    if skipped:
        log.info("download: %d of %d files already committed, skipping them", skipped, len(items))
    fetched, failed = fetch_all(ctx.ledger, todo, config)
    if failed:
        listing = "\n".join(f"  {message}" for _, message in sorted(failed.items()))
        raise DownloadError(
            f"download failed for {len(failed)} of {len(items)} files "
            f"(the other {len(items) - len(failed)} are committed):\n{listing}"
        )
    _log_sources(ctx, write_manifest(ctx.ledger, items))
    size = sum(f.size for f in fetched)
    seconds = time.monotonic() - started
    log.info(
        "download: %d files, %.1f MB in %.1f s, %d skipped (already committed)",
        len(fetched),
        size / 1e6,
        seconds,
        skipped,
    )
    ctx.record(files=len(fetched), bytes=size, skipped=skipped, seconds=seconds)
