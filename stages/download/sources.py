"""Which files a download config stands for: sources resolved against ``base_url``, globs
expanded (``hf://`` ones listed on the hub), output names chosen, expected sha256 digests
looked up in ``SHA256SUMS``, an inline mapping or the hub's LFS listing."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline import storage
from pipeline.secrets import redact_url
from stages.download.config import DownloadConfig, DownloadError
from stages.download.hub import COMMITS_UNIT, Hub, is_hub, name_in
from stages.download.manifest import MANIFEST_FILE, MANIFEST_UNIT
from stages.download.transfer import chunks, is_http

RESERVED_NAMES = frozenset({MANIFEST_FILE, MANIFEST_UNIT, COMMITS_UNIT})
"""Names of the stage's own units and files, which no downloaded file may take."""


@dataclass(frozen=True)
class FileItem:
    """One file to fetch: its output name (also its unit name), where it is, what it hashes to."""

    name: str
    url: str
    sha256: str | None
    source: str
    """Where the manifest says the file came from: the URL (credentials redacted), the
    ``hf://`` URL at its commit, the local path as the user wrote it, or ``{stage}:{name}``
    for an upstream stage's mirror; never a path under the pipeline root, so the stage
    digest does not depend on the root."""
    size: int | None = None
    """The size its source lists (the hub does), checked once the bytes are in."""
    hub: bool = False
    """Fetched from the Hugging Face hub, with the hub token."""


def _is_glob(source: str) -> bool:
    # An HTTP server cannot be listed, and "?" there starts a query string.
    return not is_http(source) and any(c in source for c in "*?[")


def _normalise(location: str) -> str:
    """A URL as given, or a local path / ``file://`` URI as an absolute path (Ray workers
    may run in another working directory)."""
    if is_http(location) or storage.is_gcs(location) or is_hub(location):
        return location
    return storage.absolute(location)


def join_url(base: str, relative: str) -> str:
    """``relative`` under ``base``, keeping a query string of an HTTP base (a token)."""
    if is_hub(base):
        return base.rstrip("/") + "/" + relative.lstrip("/")
    if not is_http(base):
        return storage.join(_normalise(base), relative)
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + "/" + relative.lstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _basename(url: str) -> str:
    return posixpath.basename(unquote(urlsplit(url).path) if is_http(url) else url)


def _prefix(base: str) -> str:
    """What every location under ``base`` starts with."""
    base = _normalise(base)
    if is_http(base):
        parts = urlsplit(base)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
    return base.rstrip("/") + "/"


def _name_under(url: str, base: str | None) -> str | None:
    """``url``'s path relative to ``base``, or None when it is not below it."""
    if base is None:
        return None
    prefix = _prefix(base)
    location = url
    if is_http(url):
        parts = urlsplit(url)
        location = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    if not location.startswith(prefix):
        return None
    return unquote(location[len(prefix) :]) if is_http(url) else location[len(prefix) :]


def resolve_sources(sources: list[str], base_url: str | None) -> list[tuple[str, str]]:
    """Every (output name, location) the sources stand for, globs expanded, in order."""
    resolved: list[tuple[str, str]] = []
    for source in sources:
        if _is_absolute(source) or base_url is None:
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
    """A ``SHA256SUMS`` file (``<hex>  <name>`` or ``<hex> *<name>`` lines), or an earlier
    download's ``manifest.json``, as name -> hex."""
    if text.lstrip().startswith("{"):
        return {f["name"]: f["sha256"] for f in json.loads(text)["files"]}
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


def _as_written(location: str, source: str, base_url: str | None) -> str:
    """``location`` as the manifest records it: a URL redacted, a local path relative to the
    working directory when the user wrote it relative (``source``, or the ``base_url`` it is
    joined to), else absolute."""
    spelled = source if _is_absolute(source) or base_url is None else base_url
    if "://" in location or _is_absolute(spelled):
        return redact_url(location)
    return os.path.relpath(location)


def _is_absolute(location: str) -> bool:
    return "://" in location or os.path.isabs(location)


def _needed(hub: Hub | None, location: str) -> Hub:
    if hub is None:
        raise DownloadError(f"{location}: hf:// sources are not read here")
    return hub


def _locate(source: str, base_url: str | None, hub: Hub | None) -> Iterator[FileItem]:
    """The files one source stands for, without the digests a checksums file gives."""
    location = source if _is_absolute(source) or base_url is None else join_url(base_url, source)
    if not is_hub(location):
        for name, url in resolve_sources([source], base_url):
            yield FileItem(name, url, None, _as_written(url, source, base_url))
        return
    for f in _needed(hub, location).files(location):
        name = name_in(location, f.path, base_url)
        yield FileItem(name, f.url, f.sha256, f.source, size=f.size, hub=True)


def _with_listed_digest(item: FileItem, sums: dict[str, str]) -> FileItem:
    """``item`` with the digest ``sums`` lists for it, which must agree with its source's."""
    listed = _expected_sha256(item.name, sums)
    if listed is None:
        raise DownloadError(f"no checksum listed for {item.name}")
    if item.sha256 is not None and item.sha256 != listed:
        raise DownloadError(
            f"{item.name}: checksums list sha256 {listed}, its source lists {item.sha256}"
        )
    return replace(item, sha256=listed)


def plan_files(
    sources: list[str],
    base_url: str | None,
    sums: dict[str, str] | None,
    hub: Hub | None = None,
) -> list[FileItem]:
    """The files to fetch with their expected digests; names must be unique, relative paths
    and (when checksums are given) listed in them."""
    items = []
    seen: set[str] = set()
    for item in (item for source in sources for item in _locate(source, base_url, hub)):
        name = item.name
        if name in seen or name in RESERVED_NAMES:
            raise DownloadError(f"two sources, or a source and the stage, share name {name}")
        if os.path.isabs(name) or ".." in name.split("/") or not name:
            raise DownloadError(
                f"cannot place {redact_url(item.url)} under the output (name {name!r})"
            )
        seen.add(name)
        items.append(item if sums is None else _with_listed_digest(item, sums))
    return items


def load_checksums(
    checksums: str | dict[str, str] | None,
    base_url: str | None,
    config: DownloadConfig,
    hub: Hub | None = None,
) -> dict[str, str] | None:
    if checksums is None:
        return None
    if isinstance(checksums, dict):
        return {name.removeprefix("./"): digest.lower() for name, digest in checksums.items()}
    if _is_absolute(checksums) or base_url is None:
        location = checksums
    else:
        location = join_url(base_url, checksums)
    if is_hub(location):
        hub = _needed(hub, location)
        (listed,) = hub.files(location)
        body = chunks(listed.url, config, hub.session())
    else:
        body = chunks(_normalise(location), config)
    return parse_checksums(b"".join(body).decode("utf-8"))
