"""Streaming a file's bytes from where it lives: HTTP(S) with ``Range`` resumption and retries
with backoff, or ``gs://`` and local files through ``pipeline.storage``, checked against the
declared or listed size."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import requests
from google.api_core.exceptions import GoogleAPIError

from pipeline import storage
from pipeline.secrets import redact_url, scrub
from stages.download.config import DownloadConfig, DownloadError

log = logging.getLogger("meshline.download")

HTTP_SCHEMES = ("http://", "https://")
# Statuses worth asking again; every other 4xx means the request itself is wrong.
RETRYABLE_STATUSES = frozenset({408, 429})
# However many retries are configured, a mirror is asked again at least this often.
MAX_BACKOFF_SECONDS = 300.0


class RangeIgnored(Exception):
    """The server answered a resume request with the whole file (or a different range)."""


class _Transient(Exception):
    """A response worth retrying (5xx, 429, a short body)."""


_RETRIED = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    _Transient,
)


def is_http(url: str) -> bool:
    return url.startswith(HTTP_SCHEMES)


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


class _HttpBody:
    """The body of one URL as it arrives over one or more requests: each request after the
    first asks for the bytes from ``received`` on (``Range``)."""

    def __init__(self, session: requests.Session, url: str, config: DownloadConfig):
        self.session = session
        self.url = url
        self.config = config
        self.received = 0
        self.total: int | None = None

    def request(self) -> Iterator[bytes]:
        """One request's chunks; a chunk cut short by a dropped connection is lost inside
        urllib3, so the next request starts after the last whole chunk."""
        headers = {"Accept-Encoding": "identity"}
        if self.received:
            headers["Range"] = f"bytes={self.received}-"
        with self.session.get(
            self.url, headers=headers, stream=True, timeout=self.config.timeout_seconds
        ) as response:
            _check_status(response, self.url)
            self._take_length(response)
            for chunk in response.iter_content(self.config.chunk_bytes):
                self.received += len(chunk)
                yield chunk

    def _take_length(self, response: requests.Response) -> None:
        if self.received:
            span = _content_range_start_total(response)
            if response.status_code != 206 or span is None or span[0] != self.received:
                raise RangeIgnored
            self.total = span[1] if span[1] is not None else self.total
        elif response.status_code == 200:
            length = response.headers.get("Content-Length", "")
            self.total = int(length) if length.isdigit() else None
        else:
            raise _Transient(f"HTTP {response.status_code} without a Range request")

    def complete(self) -> bool:
        """Whether the declared length has arrived; a short body is worth another request."""
        if self.total is None or self.received == self.total:
            return True
        if self.received > self.total:
            raise DownloadError(
                f"{redact_url(self.url)}: got {self.received} bytes, server declared {self.total}"
            )
        raise _Transient(f"connection closed after {self.received} of {self.total} bytes")


def http_chunks(session: requests.Session, url: str, config: DownloadConfig) -> Iterator[bytes]:
    """The body of ``url``, resuming with ``Range`` where a connection dropped, retrying
    transient failures with backoff; ends only once the declared length has arrived. The
    retry count starts again whenever bytes arrive."""
    body = _HttpBody(session, url, config)
    failures = 0
    while True:
        try:
            for chunk in body.request():
                failures = 0
                yield chunk
            if body.complete():
                return
        except _RETRIED as exc:
            failures += 1
            _wait_to_retry(url, exc, failures, config)


def _wait_to_retry(url: str, exc: Exception, failures: int, config: DownloadConfig) -> None:
    """Sleep before retry number ``failures``, or fail the file once retries are spent."""
    reason = str(exc) if isinstance(exc, _Transient) else f"{type(exc).__name__}: {exc}"
    reason = scrub(reason, url)
    if failures > config.retries:
        raise DownloadError(
            f"{redact_url(url)}: failed after {config.retries} retries ({reason})"
        ) from None
    delay = min(MAX_BACKOFF_SECONDS, config.backoff_seconds * 2 ** (failures - 1))
    log.warning(
        "%s: %s; retry %d of %d in %.1f s", redact_url(url), reason, failures, config.retries, delay
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


def chunks(
    location: str, config: DownloadConfig, session: requests.Session | None = None
) -> Iterator[bytes]:
    if is_http(location):
        return http_chunks(session or requests.Session(), location, config)
    return _storage_chunks(location, config.chunk_bytes)
