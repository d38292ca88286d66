"""pipeline.storage on a local directory and on a gs:// bucket (the GCS emulator).

Every behavioural test runs against both backends through the ``root`` fixture, so the two
stay interchangeable. The emulator does not enforce generation preconditions, so what
depends on them (``write_if_absent`` refusing to overwrite on GCS) is only tested locally.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.cloud.storage.fileio import DEFAULT_CHUNK_SIZE

from pipeline import storage


@pytest.fixture(params=["local", "gcs"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty storage root: a local directory or a gs:// bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket")


def put(root: str, *names: str) -> list[str]:
    """Write a small file (its own name as content) at each relative name; return the URIs."""
    uris = [storage.join(root, n) for n in names]
    for uri, name in zip(uris, names, strict=True):
        storage.write_atomic(uri, name.encode())
    return uris


def rel(root: str, uris: list[str]) -> list[str]:
    """URIs below ``root`` as relative names, for backend-independent assertions."""
    prefix = storage.join(root, "")
    assert all(u.startswith(prefix) for u in uris), uris
    return [u[len(prefix) :] for u in uris]


def visible(root: str) -> list[str]:
    """Everything under ``root``, temporary files included (bypasses list_files' filter)."""
    if storage.is_gcs(root):
        bucket, _ = storage._split_gcs(root)
        return sorted(b.name for b in storage._gcs_client().list_blobs(bucket))
    found = []
    for dirpath, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(found)


# -- paths ---------------------------------------------------------------------------------


def test_join_gcs() -> None:
    assert storage.join("gs://b", "x", "y.txt") == "gs://b/x/y.txt"
    assert storage.join("gs://b/", "/x/", "y.txt") == "gs://b/x/y.txt"
    assert storage.join("gs://b/out/", "a/b") == "gs://b/out/a/b"


def test_join_local(tmp_path) -> None:
    base = str(tmp_path)
    assert storage.join(base, "x", "y.txt") == os.path.join(base, "x", "y.txt")
    # A file:// base gives a plain path; a leading "/" in a part does not escape the base.
    assert storage.join(f"file://{base}", "/x", "y.txt") == os.path.join(base, "x", "y.txt")
    assert storage.join("rel", "x") == os.path.join("rel", "x")


def test_is_gcs_local_path_absolute(tmp_path, monkeypatch) -> None:
    assert storage.is_gcs("gs://b/k") and not storage.is_gcs("/tmp/gs://")
    assert storage.local_path("file:///a/b") == "/a/b"
    with pytest.raises(ValueError):
        storage.local_path("gs://b/k")
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("x/y") == str(tmp_path / "x" / "y")
    assert storage.absolute("gs://b/x") == "gs://b/x"


def test_temp_name_is_a_unique_hidden_sibling() -> None:
    a, b = storage.temp_name("gs://b/d/f.json"), storage.temp_name("gs://b/d/f.json")
    assert a != b
    assert a.startswith("gs://b/d/.tmp-") and a.endswith("-f.json")
    # A bare relative name stays relative (not "/.tmp-..." at the filesystem root).
    assert storage.temp_name("f.json").startswith(".tmp-")


def test_file_uri_round_trip(tmp_path) -> None:
    uri = f"file://{tmp_path}/d/x.bin"
    storage.write_atomic(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc"
    assert storage.exists(uri) and storage.size(uri) == 3
    assert storage.list_files(f"file://{tmp_path}") == [f"{tmp_path}/d/x.bin"]
    assert storage.glob(f"file://{tmp_path}/*/*.bin") == [f"{tmp_path}/d/x.bin"]


# -- reading and writing -------------------------------------------------------------------


def test_bytes_round_trip(root: str) -> None:
    data = bytes(range(256)) * 100
    uri = storage.join(root, "a", "b.bin")
    storage.write_atomic(uri, data)
    assert storage.read_bytes(uri) == data
    storage.write_atomic(uri, b"")
    assert storage.read_bytes(uri) == b""
    assert storage.exists(uri) and storage.size(uri) == 0


def test_text_round_trip(root: str) -> None:
    text = "naïve café — 日本語\nsecond line\n"
    uri = storage.join(root, "t.txt")
    with storage.open_file(uri, "w") as f:
        f.write(text)
    assert storage.read_text(uri) == text
    assert storage.read_bytes(uri) == text.encode("utf-8")  # utf-8 whatever the locale
    with storage.open_file(uri, "r") as f:
        assert f.readline() == "naïve café — 日本語\n"
        assert f.read() == "second line\n"


def test_streaming_write_and_read_in_chunks(root: str) -> None:
    # 6 MiB in uneven chunks: more than one chunk of the reader, with flushes between writes
    # (zstd writers and TextIOWrapper flush; a GCS BlobWriter refuses that by default).
    chunk = os.urandom(1 << 20)
    parts = [chunk[: 1000 + i * 7919] * (i + 1) for i in range(6)]
    uri = storage.join(root, "big", "stream.bin")
    with storage.open_file(uri, "wb") as f:
        for part in parts:
            f.write(part)
            f.flush()
    expected = b"".join(parts)
    assert storage.size(uri) == len(expected)
    assert storage.read_bytes(uri) == expected
    got = bytearray()
    with storage.open_file(uri, "rb") as f:
        while block := f.read(1 << 18):
            got += block
    assert got == expected


def test_open_file_rejects_other_modes(root: str) -> None:
    for mode in ("a", "r+", "ab", "x"):
        with pytest.raises(ValueError):
            storage.open_file(storage.join(root, "x"), mode)


def test_missing_file_raises_file_not_found(root: str) -> None:
    uri = storage.join(root, "nope", "missing.bin")
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_text(uri)
    with pytest.raises(FileNotFoundError):
        storage.size(uri)
    with pytest.raises(FileNotFoundError), storage.open_file(uri, "rb") as f:
        f.read()


def test_exists_and_size(root: str) -> None:
    uri = storage.join(root, "d", "f.bin")
    assert not storage.exists(uri)
    storage.write_atomic(uri, b"x" * 1234)
    assert storage.exists(uri)
    assert storage.size(uri) == 1234
    # A "directory" is not a file, on either backend (GCS has no directories).
    assert not storage.exists(storage.join(root, "d"))


def test_write_atomic_replaces_existing(root: str) -> None:
    uri = storage.join(root, "status.json")
    storage.write_atomic(uri, b'{"state": "RUNNING", "padding": "..........."}')
    storage.write_atomic(uri, b'{"state": "SUCCESS"}')
    assert storage.read_bytes(uri) == b'{"state": "SUCCESS"}'
    assert visible(root) == ["status.json"]


# -- listing and glob ----------------------------------------------------------------------


def test_list_files_is_recursive_and_sorted(root: str) -> None:
    names = ["b.txt", "a/2.txt", "a/1.txt", "a/sub/deep/x", "a-b.txt", "c/z.txt"]
    put(root, *names)
    assert rel(root, storage.list_files(root)) == sorted(names)
    # The same from a prefix with a trailing slash, and below a prefix.
    assert storage.list_files(root + "/") == storage.list_files(root)
    assert rel(root, storage.list_files(storage.join(root, "a"))) == [
        "a/1.txt",
        "a/2.txt",
        "a/sub/deep/x",
    ]
    # A prefix is a directory, not a name prefix: "a" does not list "a-b.txt".
    assert storage.list_files(storage.join(root, "missing")) == []


def test_list_files_returns_uris_the_other_functions_accept(root: str) -> None:
    put(root, "x/1", "x/2")
    for uri in storage.list_files(root):
        assert storage.exists(uri)
        assert storage.read_text(uri) == rel(root, [uri])[0]


def test_list_files_hides_temporary_files(root: str) -> None:
    final = storage.join(root, "out", "shard.jsonl")
    tmp = storage.temp_name(final)
    with storage.open_file(tmp, "wb") as f:
        f.write(b"partial")
    put(root, "out/done.jsonl")
    # A temp left by a killed writer is invisible to readers, listing and glob alike.
    assert rel(root, storage.list_files(root)) == ["out/done.jsonl"]
    assert rel(root, storage.glob(storage.join(root, "out", "*.jsonl"))) == ["out/done.jsonl"]
    assert storage.exists(tmp)


def test_glob_patterns(root: str) -> None:
    put(root, "d/a.jsonl", "d/b.jsonl", "d/c.txt", "d/sub/e.jsonl", "d/sub/f.txt", "top.jsonl")

    def g(pattern: str) -> list[str]:
        return rel(root, storage.glob(storage.join(root, pattern)))

    assert g("d/*.txt") == ["d/c.txt", "d/sub/f.txt"]  # "*" crosses "/" (documented)
    assert g("d/*/*.txt") == ["d/sub/f.txt"]
    assert g("d/sub/*") == ["d/sub/e.jsonl", "d/sub/f.txt"]
    assert g("*.jsonl") == ["d/a.jsonl", "d/b.jsonl", "d/sub/e.jsonl", "top.jsonl"]
    assert g("d/[ab].jsonl") == ["d/a.jsonl", "d/b.jsonl"]
    assert g("d/?.txt") == ["d/c.txt"]
    assert g("d/b*") == ["d/b.jsonl"]
    assert g("*/sub/e.*") == ["d/sub/e.jsonl"]
    assert g("nothing/*") == []
    # Without wildcards: the file itself if it exists, never a directory.
    assert g("d/c.txt") == ["d/c.txt"]
    assert g("d/missing.txt") == []
    assert g("d") == []


def test_glob_relative_local_pattern(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    put(".", "a.txt", "sub/b.txt")
    assert storage.glob("*.txt") == ["a.txt", "sub/b.txt"]
    assert storage.glob("sub/*.txt") == ["sub/b.txt"]


# -- delete --------------------------------------------------------------------------------


def test_delete_single(root: str) -> None:
    a, b = put(root, "d/a", "d/b")
    storage.delete(a)
    assert not storage.exists(a) and storage.exists(b)
    storage.delete(a)  # missing is fine
    storage.delete(storage.join(root, "never", "was"))


def test_delete_recursive(root: str) -> None:
    put(root, "out/a", "out/sub/b", "out/sub/deep/c", "outside", "out-sibling/x")
    tmp = storage.temp_name(storage.join(root, "out", "sub", "d"))
    storage.write_atomic(tmp, b"leftover")
    storage.delete(storage.join(root, "out"), recursive=True)
    # Temporary files go too; a sibling whose name merely starts with "out" stays.
    assert visible(root) == ["out-sibling/x", "outside"]
    storage.delete(storage.join(root, "out"), recursive=True)  # missing is fine


def test_delete_recursive_on_a_file(root: str) -> None:
    (uri,) = put(root, "f.bin")
    storage.delete(uri, recursive=True)
    assert visible(root) == []


def test_delete_recursive_everything(root: str) -> None:
    put(root, "a", "d/b", "d/e/c")
    storage.delete(root, recursive=True)
    assert visible(root) == []


# -- commit and writer ---------------------------------------------------------------------


def test_commit_moves_temp_to_final(root: str) -> None:
    final = storage.join(root, "out", "part-0.bin")
    tmp = storage.temp_name(final)
    with storage.open_file(tmp, "wb") as f:
        f.write(b"payload")
    assert not storage.exists(final)
    storage.commit(tmp, final)
    assert storage.read_bytes(final) == b"payload"
    assert not storage.exists(tmp)
    assert visible(root) == ["out/part-0.bin"]


def test_commit_replaces_existing_final(root: str) -> None:
    (final,) = put(root, "x.bin")
    tmp = storage.temp_name(final)
    storage.write_atomic(tmp, b"new")
    storage.commit(tmp, final)
    assert storage.read_bytes(final) == b"new"
    assert visible(root) == ["x.bin"]


def test_commit_of_missing_temp_raises(root: str) -> None:
    with pytest.raises(FileNotFoundError):
        storage.commit(storage.join(root, ".tmp-x-a"), storage.join(root, "a"))


def test_writer_commits_on_success(root: str) -> None:
    uri = storage.join(root, "w", "out.bin")
    with storage.writer(uri) as f:
        f.write(b"hello ")
        f.write(b"world")
        assert not storage.exists(uri)  # invisible until the block ends
    assert storage.read_bytes(uri) == b"hello world"
    assert visible(root) == ["w/out.bin"]


def test_writer_leaves_nothing_when_the_block_raises(root: str) -> None:
    uri = storage.join(root, "w", "out.bin")
    with pytest.raises(RuntimeError, match="boom"), storage.writer(uri) as f:
        f.write(b"x" * (3 << 20))
        raise RuntimeError("boom")
    assert visible(root) == []


def test_writer_failure_keeps_previous_file(root: str) -> None:
    (uri,) = put(root, "keep.bin")
    with pytest.raises(KeyError), storage.writer(uri) as f:
        f.write(b"half")
        raise KeyError
    assert storage.read_bytes(uri) == b"keep.bin"
    assert visible(root) == ["keep.bin"]


def test_writer_past_the_upload_chunk_size(root: str) -> None:
    # Past DEFAULT_CHUNK_SIZE (40 MiB) a GCS writer starts a resumable upload and sends
    # chunks before close; abandoning it must still leave nothing, and finishing it must
    # give every byte.
    block = os.urandom(1 << 20)
    blocks = DEFAULT_CHUNK_SIZE // len(block) + 3
    with pytest.raises(RuntimeError), storage.writer(storage.join(root, "aborted.bin")) as f:
        for _ in range(blocks):
            f.write(block)
        raise RuntimeError
    assert visible(root) == []
    uri = storage.join(root, "big.bin")
    with storage.writer(uri) as f:
        for _ in range(blocks):
            f.write(block)
    assert storage.size(uri) == blocks * len(block)
    assert storage.read_bytes(uri) == block * blocks
    assert visible(root) == ["big.bin"]


# -- write_if_absent -----------------------------------------------------------------------


def test_write_if_absent_creates(root: str) -> None:
    uri = storage.join(root, "_meta", "lease.json")
    assert storage.write_if_absent(uri, b"owner-1")
    assert storage.read_bytes(uri) == b"owner-1"
    assert visible(root) == ["_meta/lease.json"]


def test_write_if_absent_refuses_existing_local(tmp_path) -> None:
    # On GCS this is if_generation_match=0, which the emulator does not enforce.
    uri = str(tmp_path / "lease.json")
    assert storage.write_if_absent(uri, b"owner-1")
    assert not storage.write_if_absent(uri, b"owner-2")
    assert storage.read_bytes(uri) == b"owner-1"
    assert os.listdir(tmp_path) == ["lease.json"]


def test_write_if_absent_race_has_one_winner_local(tmp_path) -> None:
    uri = str(tmp_path / "lease.json")
    start = threading.Barrier(8)

    def take(i: int) -> bool:
        start.wait()
        return storage.write_if_absent(uri, f"owner-{i}".encode())

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(take, range(8)))
    assert won.count(True) == 1
    assert storage.read_text(uri) == f"owner-{won.index(True)}"
    assert os.listdir(tmp_path) == ["lease.json"]


# -- local-only atomicity details ----------------------------------------------------------


def test_write_atomic_leaves_no_temp_local(tmp_path) -> None:
    uri = str(tmp_path / "d" / "f.bin")
    storage.write_atomic(uri, b"one")
    storage.write_atomic(uri, b"two")
    assert os.listdir(tmp_path / "d") == ["f.bin"]
    # A failing write (data that is not bytes) leaves the old file and no temporary.
    with pytest.raises(TypeError):
        storage.write_atomic(uri, "not bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path / "d") == ["f.bin"]
    assert storage.read_bytes(uri) == b"two"


def test_write_atomic_uses_normal_permissions_local(tmp_path) -> None:
    # Other users of a shared filesystem (Ray workers, a second account) read our outputs.
    umask = os.umask(0)
    os.umask(umask)
    uri = str(tmp_path / "f.bin")
    storage.write_atomic(uri, b"x")
    assert os.stat(uri).st_mode & 0o777 == 0o666 & ~umask
