"""The download stage against real servers on 127.0.0.1: a misbehaving HTTP mirror, the GCS
emulator and local directories. Each test runs the registered stage function in-process on
the ``ray_cluster`` fixture, as the executor's stage actor would."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from pydantic import ValidationError

from pipeline import storage
from pipeline.ledger import Ledger
from pipeline.stage import REGISTRY, StageContext, Upstream
from stages.demo_corpus import DemoCorpusConfig, build_demo_corpus
from stages.documents import DocumentFields
from stages.download import (
    DocumentCheck,
    DownloadConfig,
    DownloadError,
    parse_checksums,
    redact_url,
    resolve_sources,
)
from tests.autoscaling import free_port
from tests.httpserver import FileServer

PILE_FILES = ("train/00.jsonl.zst", "train/01.jsonl.zst", "val.jsonl.zst", "test.jsonl.zst")
FAST = {"backoff_seconds": 0.01, "timeout_seconds": 10, "chunk_mb": 0.001}


def pile_bytes(seed: int, documents: int = 40) -> bytes:
    """A small Pile-format jsonl.zst whose bytes barely compress (so byte offsets matter)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        text = " ".join(f"{rng.getrandbits(40):x}" for _ in range(rng.randint(5, 40)))
        lines.append(json.dumps({"text": text, "meta": {"pile_set_name": "Pile-CC"}}) + "\n")
    return zstandard.ZstdCompressor().compress("".join(lines).encode())


def write_mirror(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items())
    (root / "SHA256SUMS.txt").write_text(sums)


@pytest.fixture
def mirror(tmp_path: Path) -> dict[str, bytes]:
    """The four Pile files (and SHA256SUMS.txt) under ``tmp_path/mirror``."""
    files = {name: pile_bytes(seed) for seed, name in enumerate(PILE_FILES)}
    write_mirror(tmp_path / "mirror", files)
    return files


@pytest.fixture
def server(tmp_path: Path, mirror: dict[str, bytes]) -> Iterator[FileServer]:
    with FileServer(str(tmp_path / "mirror")).running() as running:
        yield running


def run_stage(name: str, config: Any, output: str, inputs: dict[str, Upstream]) -> StageContext:
    """Run registered stage ``name`` as the executor would, without the executor."""
    ctx = StageContext(
        name=name, config=config, output=output, inputs=inputs, ledger=Ledger(output)
    )
    REGISTRY[name].run(ctx)
    return ctx


def run_download(
    tmp_path: Path,
    output: str | None = None,
    inputs: dict[str, Upstream] | None = None,
    **settings: Any,
) -> StageContext:
    output = output or str(tmp_path / "out")
    return run_stage("download", DownloadConfig(**settings), output, inputs or {})


def assert_output_matches(output: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (output / name).read_bytes() == data, name
    manifest = json.loads((output / "manifest.json").read_text())["files"]
    assert [(f["name"], f["size"], f["sha256"]) for f in manifest] == sorted(
        (name, len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()
    )


@pytest.mark.usefixtures("ray_cluster")
def test_mirror_download_is_verified_and_a_rerun_fetches_nothing(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    ctx = run_download(
        tmp_path, sources=list(PILE_FILES), base_url=server.url, checksums="SHA256SUMS.txt", **FAST
    )
    assert_output_matches(tmp_path / "out", mirror)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]
    assert {f["source"] for f in manifest} == {f"{server.url}/{name}" for name in PILE_FILES}
    assert ctx.metrics["files"] == 4 and ctx.metrics["skipped"] == 0
    assert ctx.metrics["bytes"] == sum(len(d) for d in mirror.values())
    digest = ctx.ledger.digest()

    fetched = server.data_hits()
    again = run_download(
        tmp_path, sources=list(PILE_FILES), base_url=server.url, checksums="SHA256SUMS.txt", **FAST
    )
    assert server.data_hits() == fetched
    assert again.metrics["files"] == 0 and again.metrics["skipped"] == 4
    assert again.ledger.digest() == digest


@pytest.mark.usefixtures("ray_cluster")
def test_a_dropped_connection_resumes_with_range(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    chunk = DownloadConfig(sources=["x"], **FAST).chunk_bytes
    server.misbehave.drop_after["/train/00.jsonl.zst"] = 2 * chunk + 500
    run_download(
        tmp_path, sources=list(PILE_FILES), base_url=server.url, checksums="SHA256SUMS.txt", **FAST
    )
    # The bytes of the chunk cut short are read again; the whole chunks before it are kept.
    ranges = [r.range for r in server.requests if r.path == "/train/00.jsonl.zst"]
    assert ranges == [None, f"bytes={2 * chunk}-"]
    assert_output_matches(tmp_path / "out", mirror)


@pytest.mark.usefixtures("ray_cluster")
def test_a_server_that_ignores_range_makes_the_file_start_over(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    chunk = DownloadConfig(sources=["x"], **FAST).chunk_bytes
    server.misbehave.drop_after["/val.jsonl.zst"] = chunk + 100
    server.misbehave.ignore_range.add("/val.jsonl.zst")
    run_download(
        tmp_path, sources=["val.jsonl.zst"], base_url=server.url, checksums="SHA256SUMS.txt", **FAST
    )
    ranges = [r.range for r in server.requests if r.path == "/val.jsonl.zst"]
    assert ranges == [None, f"bytes={chunk}-", None]
    assert (tmp_path / "out" / "val.jsonl.zst").read_bytes() == mirror["val.jsonl.zst"]


@pytest.mark.usefixtures("ray_cluster")
def test_server_errors_are_retried_with_backoff(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    server.misbehave.errors["/test.jsonl.zst"] = 3
    run_download(tmp_path, sources=["test.jsonl.zst"], base_url=server.url, retries=3, **FAST)
    assert [r.status for r in server.requests] == [500, 500, 500, 200]
    assert (tmp_path / "out" / "test.jsonl.zst").read_bytes() == mirror["test.jsonl.zst"]


@pytest.mark.usefixtures("ray_cluster")
def test_404_fails_at_once_naming_the_url_and_keeps_the_other_units(
    tmp_path: Path, server: FileServer
) -> None:
    with pytest.raises(DownloadError) as failure:
        run_download(
            tmp_path, sources=["val.jsonl.zst", "missing.jsonl.zst"], base_url=server.url, **FAST
        )
    assert f"{server.url}/missing.jsonl.zst: HTTP 404" in str(failure.value)
    assert server.hits("/missing.jsonl.zst") == 1
    ledger = Ledger(str(tmp_path / "out"))
    assert ledger.is_committed("val.jsonl.zst")
    assert not ledger.is_committed("missing.jsonl.zst")
    assert not ledger.is_committed("manifest")


@pytest.mark.usefixtures("ray_cluster")
def test_wrong_bytes_once_are_fetched_again(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    server.misbehave.wrong_bytes["/val.jsonl.zst"] = 1
    run_download(
        tmp_path, sources=["val.jsonl.zst"], base_url=server.url, checksums="SHA256SUMS.txt", **FAST
    )
    assert server.hits("/val.jsonl.zst") == 2
    assert (tmp_path / "out" / "val.jsonl.zst").read_bytes() == mirror["val.jsonl.zst"]


@pytest.mark.usefixtures("ray_cluster")
def test_wrong_bytes_twice_fail_naming_the_file_and_both_digests(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    server.misbehave.wrong_bytes["/val.jsonl.zst"] = 2
    wrong = bytes(b ^ 0xFF for b in mirror["val.jsonl.zst"])
    with pytest.raises(DownloadError) as failure:
        run_download(
            tmp_path,
            sources=["val.jsonl.zst"],
            base_url=server.url,
            checksums="SHA256SUMS.txt",
            **FAST,
        )
    message = str(failure.value)
    assert "val.jsonl.zst: sha256 mismatch" in message
    assert f"expected {hashlib.sha256(mirror['val.jsonl.zst']).hexdigest()}" in message
    assert f"got {hashlib.sha256(wrong).hexdigest()}" in message
    assert server.hits("/val.jsonl.zst") == 2
    assert not (tmp_path / "out" / "val.jsonl.zst").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_files_that_are_not_pile_fail_their_units_while_good_ones_commit(
    tmp_path: Path, mirror: dict[str, bytes]
) -> None:
    compress = zstandard.ZstdCompressor().compress
    files = {
        "good.jsonl.zst": mirror["val.jsonl.zst"],
        "plain.jsonl.zst": b'{"text": "not compressed", "meta": {"pile_set_name": "x"}}\n',
        "cut.jsonl.zst": mirror["test.jsonl.zst"][:-20],
        "other.jsonl.zst": compress(b'{"id": 1, "body": "some other dataset"}\n'),
    }
    write_mirror(tmp_path / "bad", files)
    with FileServer(str(tmp_path / "bad")).running() as server, pytest.raises(DownloadError) as e:
        run_download(tmp_path, sources=sorted(files), base_url=server.url, **FAST)
    message = str(e.value)
    assert "failed for 3 of 4 files" in message
    assert "plain.jsonl.zst: corrupt zstd data near compressed byte 0: zstd decompressor" in message
    assert "cut.jsonl.zst: truncated zstd stream, ends inside a frame" in message
    assert "other.jsonl.zst: first line lacks the configured document fields: missing text" in (
        message
    )
    ledger = Ledger(str(tmp_path / "out"))
    assert [r["name"] for r in ledger.records()] == ["good.jsonl.zst"]
    assert (tmp_path / "out" / "good.jsonl.zst").read_bytes() == files["good.jsonl.zst"]


@pytest.mark.usefixtures("ray_cluster")
def test_credentials_never_reach_errors_logs_or_the_manifest(
    tmp_path: Path, server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="meshline")
    host = server.url.removeprefix("http://")
    server.misbehave.require_auth = "Basic " + base64.b64encode(b"user:s3cret").decode()
    dead = f"http://user:s3cret@127.0.0.1:{free_port()}/val.jsonl.zst?X-Goog-Signature=hush"
    sources = [
        f"http://user:s3cret@{host}/train/00.jsonl.zst?token=hush",
        f"http://user:s3cret@{host}/missing.jsonl.zst?token=hush",
        dead,
    ]
    with pytest.raises(DownloadError) as failure:
        run_download(tmp_path, sources=sources, retries=1, **FAST)
    texts = [str(failure.value), caplog.text]
    texts += [json.dumps(r) for r in Ledger(str(tmp_path / "out")).records()]
    for text in texts:
        assert "s3cret" not in text and "hush" not in text
    assert f"http://<redacted>@{host}/missing.jsonl.zst?<redacted>: HTTP 404" in str(failure.value)
    assert "failed after 1 retries (ConnectionError" in str(failure.value)
    assert server.requests[0].query == "token=hush"
    record = Ledger(str(tmp_path / "out")).record("00.jsonl.zst")
    assert record["metadata"]["source"] == f"http://<redacted>@{host}/train/00.jsonl.zst?<redacted>"


@pytest.mark.usefixtures("ray_cluster")
def test_a_partial_run_is_finished_by_fetching_only_the_rest(
    tmp_path: Path, server: FileServer, mirror: dict[str, bytes]
) -> None:
    settings = {"sources": list(PILE_FILES), "base_url": server.url, **FAST, "retries": 0}
    server.misbehave.errors["/val.jsonl.zst"] = 1
    with pytest.raises(DownloadError, match="val.jsonl.zst"):
        run_download(tmp_path, **settings)
    before = {name: server.hits(f"/{name}") for name in PILE_FILES}
    assert before == dict.fromkeys(PILE_FILES, 1)

    ctx = run_download(tmp_path, **settings)
    after = {name: server.hits(f"/{name}") for name in PILE_FILES}
    assert after == {**before, "val.jsonl.zst": 2}
    assert ctx.metrics["files"] == 1 and ctx.metrics["skipped"] == 3
    assert_output_matches(tmp_path / "out", mirror)


@pytest.mark.usefixtures("ray_cluster")
def test_gcs_source_to_gcs_output_on_the_emulator(
    tmp_path: Path, gcs_bucket: str, mirror: dict[str, bytes]
) -> None:
    for name, data in mirror.items():
        storage.write_atomic(f"{gcs_bucket}/pile/{name}", data)
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in mirror.items()}
    output = f"{gcs_bucket}/out"
    ctx = run_download(
        tmp_path,
        output=output,
        sources=["train/*.jsonl.zst", f"{gcs_bucket}/pile/val.jsonl.zst", "test.jsonl.zst"],
        base_url=f"{gcs_bucket}/pile",
        checksums=sums,
        **FAST,
    )
    assert ctx.metrics["files"] == 4
    for name, data in mirror.items():
        assert storage.read_bytes(f"{output}/{name}") == data
    manifest = json.loads(storage.read_text(f"{output}/manifest.json"))["files"]
    assert [f["source"] for f in manifest] == [f"{gcs_bucket}/pile/{n}" for n in sorted(mirror)]


@pytest.mark.usefixtures("ray_cluster")
def test_local_globs_and_file_urls(tmp_path: Path, mirror: dict[str, bytes]) -> None:
    root = tmp_path / "mirror"
    run_download(
        tmp_path,
        sources=["train/*.jsonl.zst", "val.jsonl.zst", f"file://{root}/test.jsonl.zst"],
        base_url=str(root),
        checksums="SHA256SUMS.txt",
        **FAST,
    )
    assert_output_matches(tmp_path / "out", mirror)

    ctx = run_download(tmp_path, output=str(tmp_path / "flat"), sources=[f"{root}/train/0?.*"])
    assert sorted(p.name for p in (tmp_path / "flat").glob("*.zst")) == [
        "00.jsonl.zst",
        "01.jsonl.zst",
    ]
    assert ctx.metrics["files"] == 2


@pytest.mark.usefixtures("ray_cluster")
def test_demo_corpus_is_built_then_downloaded_through_the_normal_path(tmp_path: Path) -> None:
    demo = DemoCorpusConfig(train_shards=2, max_text_mb=0.3, math_documents=20)
    corpus = run_stage("demo_corpus", demo, str(tmp_path / "corpus"), {})
    upstream = Upstream("demo_corpus", corpus.output, "fp", corpus.ledger.digest())
    ctx = run_download(tmp_path, inputs={"demo_corpus": upstream}, **FAST)
    names = build_demo_corpus(str(tmp_path / "demo-mirror"), demo)
    files = {name: (tmp_path / "demo-mirror" / name).read_bytes() for name in names}
    assert_output_matches(tmp_path / "out", files)
    assert ctx.metrics["files"] == len(names) == 4


def test_config_needs_one_kind_of_source() -> None:
    with pytest.raises(ValueError, match="give sources"):
        DownloadConfig().check_inputs(())
    with pytest.raises(ValueError, match="demo_corpus stage excludes"):
        DownloadConfig(sources=["a.jsonl.zst"]).check_inputs(("demo_corpus",))
    with pytest.raises(ValidationError, match="extra"):
        DownloadConfig(sources=["a"], mirror="x")


def test_redact_url_hides_userinfo_and_query() -> None:
    url = "https://alice:pw@mirror.example/pile/val.jsonl.zst?X-Goog-Signature=abc&x=1"
    assert redact_url(url) == "https://<redacted>@mirror.example/pile/val.jsonl.zst?<redacted>"
    assert redact_url("gs://bucket/pile/val.jsonl.zst") == "gs://bucket/pile/val.jsonl.zst"
    assert redact_url("/data/pile/val.jsonl.zst") == "/data/pile/val.jsonl.zst"


def test_names_are_relative_to_the_base_or_the_file_name() -> None:
    base = "https://mirror.example/pile/?token=t"
    resolved = resolve_sources(
        ["train/00.jsonl.zst", "https://other.example/x/val.jsonl.zst?sig=1"], base
    )
    assert resolved == [
        ("train/00.jsonl.zst", "https://mirror.example/pile/train/00.jsonl.zst?token=t"),
        ("val.jsonl.zst", "https://other.example/x/val.jsonl.zst?sig=1"),
    ]


def test_checksum_files_in_either_sha256sum_style() -> None:
    text = "AB12  ./train/00.jsonl.zst\ncd34 *val.jsonl.zst\n\n"
    assert parse_checksums(text) == {"train/00.jsonl.zst": "ab12", "val.jsonl.zst": "cd34"}


def fed(check: DocumentCheck, data: bytes, piece: int = 7) -> DocumentCheck:
    """``check`` after ``data`` streamed past it in pieces of ``piece`` bytes."""
    for start in range(0, len(data), piece):
        check.feed(data[start : start + piece])
    return check


def test_document_check_accepts_several_zstd_frames_fed_in_odd_pieces() -> None:
    compress = zstandard.ZstdCompressor().compress
    line = json.dumps({"text": "a" * 5000, "meta": {"pile_set_name": "Github"}}).encode()
    data = compress(line[:3000]) + compress(line[3000:] + b"\n") + compress(b"more\n")
    fed(DocumentCheck("x.jsonl.zst", DocumentFields()), data).finish()


def test_document_check_reads_gzip_members_and_the_configured_fields() -> None:
    line = json.dumps({"text": "t", "meta": {"redpajama_set_name": "RedPajamaC4"}}) + "\n"
    data = gzip.compress(line.encode()) + gzip.compress(b"more\n")
    slimpajama = DocumentFields(component_field="meta.redpajama_set_name")
    fed(DocumentCheck("x.jsonl.gz", slimpajama), data).finish()
    with pytest.raises(DownloadError, match=r"x.jsonl.gz: first line lacks .*meta.pile_set_name"):
        fed(DocumentCheck("x.jsonl.gz", DocumentFields()), data).finish()
    with pytest.raises(DownloadError, match=r"x.json.gz: truncated gzip stream"):
        fed(DocumentCheck("x.json.gz", slimpajama), data[:-9]).finish()


def test_document_check_finds_the_columns_in_a_parquet_footer() -> None:
    buffer = io.BytesIO()
    table = pa.table({"content": ["a"] * 300, "meta": [{"source": "web"}] * 300})
    pq.write_table(table, buffer, row_group_size=50)
    data = buffer.getvalue()
    web = DocumentFields(text_field="content", component_field="meta.source")
    fed(DocumentCheck("x.parquet", web), data, 100).finish()
    with pytest.raises(DownloadError, match=r"x.parquet: no column 'text' \(columns: content"):
        fed(DocumentCheck("x.parquet", DocumentFields()), data, 100).finish()
    with pytest.raises(DownloadError, match=r"x.parquet: not Parquet \(no PAR1 magic"):
        fed(DocumentCheck("x.parquet", DocumentFields()), data[:-1]).finish()
