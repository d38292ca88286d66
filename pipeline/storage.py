"""One small file API over local paths and ``gs://`` URIs.

Every stage reads and writes through these functions, so the same code runs on a laptop
and on a pod whose outputs live in a bucket. Paths are plain strings: a local path
(absolute or relative), a ``file://`` URI, or ``gs://bucket/key``. Functions that return
local names (``join``, ``list_files``, ``glob``) return plain paths, also for ``file://``.

The two backends behave alike: there are only files (a local directory is not a file for
``exists``, and ``list_files`` / ``delete(recursive=True)`` treat a prefix as a directory);
a missing file raises ``FileNotFoundError``; text is UTF-8.

Atomicity: ``write_atomic``, ``commit`` and ``writer`` never leave a half-written file under
the final name. Locally that is write-to-temp then ``os.replace``; on GCS a single object
upload is already atomic, and ``commit`` is a server-side copy followed by deleting the
temporary. Temporary names (``temp_name``) start with ``.tmp-``; ``list_files`` and ``glob``
leave them out, so what a killed writer left behind is never read as output.
``write_if_absent`` is the create-only write a status lease is taken with (a hard link,
which fails if the name exists, or the GCS precondition ``if_generation_match=0``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shutil
import uuid
from collections.abc import Iterator
from functools import cache
from typing import IO, Any

from google.api_core.exceptions import NotFound, PreconditionFailed

GCS_PREFIX = "gs://"
TEMP_PREFIX = ".tmp-"


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_PREFIX)


def local_path(uri: str) -> str:
    """A local filesystem path for a plain path or ``file://`` URI."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if is_gcs(uri):
        raise ValueError(f"{uri} is not a local path")
    return uri


def join(base: str, *parts: str) -> str:
    """``base/part/...``; a part's leading ``/`` does not restart the path on either backend."""
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(local_path(base), *(p.lstrip("/") for p in parts))


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (Ray workers may run in another cwd)."""
    return uri if is_gcs(uri) else os.path.abspath(local_path(uri))


def _split_gcs(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(GCS_PREFIX) :].partition("/")
    return bucket, key


@cache
def _gcs_client() -> Any:
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(project="meshline-test", credentials=AnonymousCredentials())
    return gcs.Client()


def _blob(uri: str) -> Any:
    bucket, key = _split_gcs(uri)
    if not key:
        raise ValueError(f"{uri} names a bucket, not a file")
    return _gcs_client().bucket(bucket).blob(key)


@contextlib.contextmanager
def _not_found_is_oserror(uri: str) -> Iterator[None]:
    """Raise what a local file operation would, so callers handle one exception."""
    try:
        yield
    except NotFound as e:
        raise FileNotFoundError(errno.ENOENT, "No such object", uri) from e


def _makedirs_for(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def open_file(uri: str, mode: str = "rb") -> IO[Any]:
    """Open for streaming read or write (``rb``, ``wb``, ``r``, ``w``; text is UTF-8).

    A GCS write becomes visible only when the file is closed; a binary write whose ``with``
    block raises is abandoned. Parent directories of a local write are created.
    """
    if mode not in ("rb", "wb", "r", "w"):
        raise ValueError(f"unsupported mode {mode!r} for {uri}")
    encoding = None if "b" in mode else "utf-8"
    if is_gcs(uri):
        blob = _blob(uri)
        if mode == "wb":
            # flush() cannot upload a partial object; make it a no-op (as text mode does)
            # so that wrappers which flush (zstd, TextIOWrapper, hashing writers) work.
            return blob.open("wb", ignore_flush=True)
        if "r" in mode:
            # Fail at open like a local file, and pin the generation that later chunked
            # reads fetch: a concurrent overwrite makes them fail instead of mixing versions.
            with _not_found_is_oserror(uri):
                blob.reload()
        return blob.open(mode, encoding=encoding)
    path = local_path(uri)
    if "w" in mode:
        _makedirs_for(path)
    return open(path, mode, encoding=encoding)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        # One request, with the checksum verified (chunked reads through open_file skip it).
        with _not_found_is_oserror(uri):
            return _blob(uri).download_as_bytes()
    with open(local_path(uri), "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    """Whether ``uri`` is a file (a local directory is not: GCS has none)."""
    if is_gcs(uri):
        return bool(_blob(uri).exists())
    return os.path.isfile(local_path(uri))


def size(uri: str) -> int:
    if is_gcs(uri):
        blob = _blob(uri)
        with _not_found_is_oserror(uri):
            blob.reload()
        return int(blob.size)
    return os.path.getsize(local_path(uri))


def _is_temp(uri: str) -> bool:
    return uri.rpartition("/")[2].startswith(TEMP_PREFIX)


def _walk(prefix: str) -> list[str]:
    """Every file below the directory ``prefix``, temporaries included, sorted."""
    if is_gcs(prefix):
        bucket, key = _split_gcs(prefix)
        key = key.rstrip("/") + "/" if key.strip("/") else ""
        blobs = _gcs_client().list_blobs(bucket, prefix=key)
        # Names ending in "/" are the empty "folder" objects that consoles create.
        return sorted(f"{GCS_PREFIX}{bucket}/{b.name}" for b in blobs if not b.name.endswith("/"))
    root = local_path(prefix)
    found = []
    for dirpath, _, names in os.walk(root or os.curdir):
        found.extend(os.path.join(dirpath, n) for n in names)
    if not root:  # the current directory: names relative to it, without "./"
        found = [f[len(os.curdir) + 1 :] for f in found]
    return sorted(found)


def list_files(prefix: str) -> list[str]:
    """Every file below the directory ``prefix`` (recursively), sorted, without temporaries.

    ``prefix`` is a directory, not a name prefix: ``out`` does not list ``out-old/x``.
    """
    return [f for f in _walk(prefix) if not _is_temp(f)]


def glob(pattern: str) -> list[str]:
    """Files matching a shell-style pattern, sorted, without temporaries.

    ``*`` and ``?`` also match ``/`` (fnmatch rules), so ``d/*.txt`` matches ``d/x/y.txt``
    too; a pattern without wildcards gives that file if it exists.
    """
    if not is_gcs(pattern):
        pattern = local_path(pattern)
    wild = [i for i, c in enumerate(pattern) if c in "*?["]
    if not wild:
        return [pattern] if exists(pattern) else []
    # List the directory that holds the first wildcard, then filter.
    base = pattern[: pattern.rfind("/", 0, wild[0]) + 1]
    return [f for f in list_files(base) if fnmatch.fnmatchcase(f, pattern)]


def _write_local_temp(path: str, data: bytes) -> str:
    """Write ``data`` durably to a new temporary sibling of ``path``; return its name."""
    _makedirs_for(path)
    tmp = temp_name(path)
    try:
        # "x": created here, never shared; permissions follow the umask, unlike mkstemp's 0600.
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def write_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a mix."""
    if is_gcs(uri):
        _blob(uri).upload_from_string(data)
        return
    path = local_path(uri)
    tmp = _write_local_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists; True if this call created it.

    Checking and creating are one atomic step, so of several concurrent callers exactly one
    gets True. On GCS a retried upload whose lost first attempt had landed is recognised by
    its content: give each caller distinct ``data`` (e.g. with an owner id) when it matters.
    """
    if is_gcs(uri):
        blob = _blob(uri)
        try:
            blob.upload_from_string(data, if_generation_match=0)
        except PreconditionFailed:
            with contextlib.suppress(NotFound):
                return bool(blob.download_as_bytes() == data)
            return False
        return True
    path = local_path(uri)
    tmp = _write_local_temp(path, data)
    try:
        os.link(tmp, path)  # unlike a rename, a link never replaces an existing name
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def temp_name(uri: str) -> str:
    """A unique hidden sibling name for writing ``uri`` before ``commit``."""
    head, sep, tail = uri.rpartition("/")
    return f"{head}{sep}{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{tail}"


def commit(tmp_uri: str, final_uri: str) -> None:
    """Move a finished temporary file to its final name atomically (replacing it)."""
    if is_gcs(tmp_uri):
        src = _blob(tmp_uri)
        bucket, key = _split_gcs(final_uri)
        with _not_found_is_oserror(tmp_uri):
            src.bucket.copy_blob(src, _gcs_client().bucket(bucket), key)
        with contextlib.suppress(NotFound):  # already gone after a retried delete
            src.delete()
        return
    dst = local_path(final_uri)
    _makedirs_for(dst)
    os.replace(local_path(tmp_uri), dst)


def delete(uri: str, recursive: bool = False) -> None:
    """Remove a file, or with ``recursive`` also everything below it as a directory
    (temporaries included). Missing is fine."""
    if is_gcs(uri):
        targets = _walk(uri) if recursive else []
        if _split_gcs(uri)[1].strip("/"):
            targets.append(uri)
        for target in targets:
            with contextlib.suppress(NotFound):
                _blob(target).delete()
        return
    path = local_path(uri)
    with contextlib.suppress(FileNotFoundError):
        if recursive and os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


@contextlib.contextmanager
def writer(uri: str) -> Iterator[IO[bytes]]:
    """Stream to a temporary name and commit to ``uri`` only if the block succeeds."""
    tmp = temp_name(uri)
    try:
        with open_file(tmp, "wb") as f:
            yield f
    except BaseException:
        delete(tmp)
        raise
    commit(tmp, uri)


@contextlib.contextmanager
def new_local_directory(dest: str, purpose: str) -> Iterator[str]:
    """A hidden sibling of ``dest`` (a new local directory) to build it in, renamed into
    place if the block succeeds and removed if it fails; ``purpose`` (import, export) is
    named when ``dest`` exists already."""
    dest = os.path.abspath(local_path(dest))
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; {purpose} writes a new directory")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.partial-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        yield tmp
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
