"""``hf://`` sources against a local imitation of the Hugging Face hub (``tests/hubserver.py``):
listing through huggingface_hub at one commit kept in the ledger, the redirect to a CDN that
drops a connection, checks against the LFS sha256 and the listed size, private repos and
where their token must never appear."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.ledger import Ledger
from pipeline.stage import REGISTRY, StageContext
from stages.download import DownloadConfig, DownloadError
from stages.download.hub import COMMITS_UNIT, Hub
from tests.autoscaling import free_port
from tests.dedup_corpus import encoded, pile_record, random_text
from tests.hubserver import CDN_SIGNATURE, HubServer

FAST = {"backoff_seconds": 0.01, "timeout_seconds": 10, "chunk_mb": 0.001}
TOKEN = "hf_secretTOKENvalue123"
PILE = "hf://datasets/org/pile"


def pile_files(seed: int) -> dict[str, bytes]:
    """A Pile-layout dataset repo: LFS train shards, a val file and a card kept in git."""
    rng = random.Random(seed)

    def shard(count: int, suffix: str) -> bytes:
        return encoded([pile_record(random_text(rng, 60)) for _ in range(count)], suffix)

    return {
        "train/00.jsonl.zst": shard(30, ".jsonl.zst"),
        "train/01.jsonl.zst": shard(30, ".jsonl.zst"),
        "val.jsonl": shard(5, ".jsonl"),
        "README.md": b"# A Pile mirror\n",
    }


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    # No token from this machine's environment or login reaches the tests' hub.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with HubServer(tmp_path / "hub").running() as server:
        yield server


def run_download(
    tmp_path: Path, hub: HubServer, output_dir: str = "out", **settings: Any
) -> StageContext:
    output = str(tmp_path / output_dir)
    config = DownloadConfig(hf_endpoint=hub.url, **FAST, **settings)
    ctx = StageContext(
        name="download", config=config, output=output, inputs={}, ledger=Ledger(output)
    )
    REGISTRY["download"].run(ctx)
    return ctx


def manifest(tmp_path: Path) -> dict[str, dict]:
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]
    return {e["name"]: e for e in entries}


@pytest.mark.usefixtures("ray_cluster")
def test_a_dataset_repo_downloads_at_one_commit_kept_for_reruns(
    tmp_path: Path, hub: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="meshline")
    files = pile_files(0)
    commit = hub.push("org/pile", files)
    chunk = DownloadConfig(**FAST).chunk_bytes
    hub.cdn.misbehave.drop_after[hub.cdn_path(files["train/00.jsonl.zst"])] = 2 * chunk + 300
    sources = ["train/*.jsonl.zst", "val.jsonl"]
    run_download(tmp_path, hub, base_url=f"{PILE}/", sources=sources)

    listed = manifest(tmp_path)
    assert sorted(listed) == ["train/00.jsonl.zst", "train/01.jsonl.zst", "val.jsonl"]
    for name, entry in listed.items():
        assert (tmp_path / "out" / name).read_bytes() == files[name]
        assert entry["sha256"] == hashlib.sha256(files[name]).hexdigest()
        assert entry["source"] == f"{PILE}@{commit}/{name}"
    # The LFS shards came from the CDN, one resumed after the dropped connection; the token-
    # free CDN was never shown an Authorization header, and its signed URL was never logged.
    ranges = [r.range for r in hub.cdn.requests]
    assert sorted(ranges, key=str) == [None, None, f"bytes={2 * chunk}-"]
    assert CDN_SIGNATURE not in caplog.text
    assert f"{PILE}@main is commit {commit}" in caplog.text

    # main moves on; a run killed before two files committed is rerun: it lists and fetches
    # them at the commit it started from, not at the new head.
    hub.push("org/pile", pile_files(1))
    units = tmp_path / "out" / "_meta" / "units"
    for unit in ("train__01.jsonl.zst", "val.jsonl", "manifest"):
        (units / f"{unit}.json").unlink()
    before = len(hub.cdn.requests)
    run_download(tmp_path, hub, base_url=f"{PILE}/", sources=sources)
    assert len(hub.cdn.requests) == before + 1
    assert manifest(tmp_path) == listed
    assert Ledger(str(tmp_path / "out")).record(COMMITS_UNIT)["metadata"]["commits"] == {
        f"{PILE}@main": commit
    }

    # A new download held to the first one's manifest refuses main's new bytes up front.
    pinned = str(tmp_path / "out" / "manifest.json")
    with pytest.raises(DownloadError, match="train/00.jsonl.zst: checksums list sha256"):
        run_download(tmp_path, hub, "again", base_url=f"{PILE}/", sources=sources, checksums=pinned)
    assert len(hub.cdn.requests) == before + 1


@pytest.mark.usefixtures("ray_cluster")
def test_wrong_bytes_from_the_cdn_fail_naming_the_file_and_the_digests(
    tmp_path: Path, hub: HubServer
) -> None:
    files = pile_files(2)
    hub.push("org/pile", files)
    hub.cdn.misbehave.wrong_bytes[hub.cdn_path(files["train/01.jsonl.zst"])] = 2
    with pytest.raises(DownloadError) as failure:
        run_download(tmp_path, hub, sources=[f"{PILE}/train/*"])
    expected = hashlib.sha256(files["train/01.jsonl.zst"]).hexdigest()
    assert f"train/01.jsonl.zst: sha256 mismatch, expected {expected}" in str(failure.value)
    assert "(the other 1 are committed)" in str(failure.value)
    assert (tmp_path / "out" / "train/00.jsonl.zst").read_bytes() == files["train/00.jsonl.zst"]


@pytest.mark.usefixtures("ray_cluster")
def test_a_private_repo_needs_the_token_which_never_shows(
    tmp_path: Path,
    hub: HubServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level("INFO", logger="meshline")
    files = {"data/part-0.parquet": encoded([{"text": "private words"}] * 9, ".parquet")}
    hub.push("org/private", files, token=TOKEN)
    settings = {"sources": ["hf://datasets/org/private/data/*.parquet"]}
    settings["documents"] = {"component": "private"}
    errors = []
    for token in (None, "hf_wrong"):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(DownloadError) as failure:
            run_download(tmp_path, hub, **settings)
        errors.append(str(failure.value))
    assert "private or gated and HF_TOKEN is not set" in errors[0]
    assert "the token (HF_TOKEN) may not read it" in errors[1] and "hf_wrong" not in errors[1]

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_download(tmp_path, hub, **settings)
    assert (tmp_path / "out" / "data/part-0.parquet").read_bytes() == files["data/part-0.parquet"]
    resolved = [auth for path, auth in hub.requests if "/resolve/" in path]
    assert resolved == [f"Bearer {TOKEN}"]
    assert [r.authorization for r in hub.cdn.requests] == [None]
    shown = errors + [caplog.text, (tmp_path / "out" / "manifest.json").read_text()]
    shown += [json.dumps(r) for r in Ledger(str(tmp_path / "out")).records()]
    assert not any(TOKEN in text for text in shown)
    assert TOKEN not in repr(Hub("http://hub", TOKEN))


def test_hub_locations_that_cannot_be_listed_are_named(hub: HubServer) -> None:
    hub.push("org/pile", pile_files(3))
    cases = {
        "hf://datasets/org": "expected hf://datasets/OWNER/NAME[@REVISION]/PATH",
        "hf://spaces/org/pile/x": "expected hf://datasets/OWNER/NAME[@REVISION]/PATH",
        "hf://datasets/org/none/x": "no such repo at",
        f"{PILE}@v9/val.jsonl": "no revision 'v9'",
        f"{PILE}/nowhere/*.zst": "no such path",
        f"{PILE}/train/*.parquet": "no files match at commit",
    }
    for location, message in cases.items():
        with pytest.raises(DownloadError) as failure:
            Hub(hub.url, None).files(location)
        assert str(failure.value).startswith(f"{location}: "), failure.value
        assert message in str(failure.value), location
    with pytest.raises(DownloadError, match="listing the repo failed .*Connect"):
        Hub(f"http://127.0.0.1:{free_port()}", None).files(f"{PILE}/val.jsonl")
    # Globs match within one directory level, as local globs do; the listing is paginated.
    assert [f.path for f in Hub(hub.url, None).files(f"{PILE}/*")] == ["README.md", "val.jsonl"]
    assert len(Hub(hub.url, None).files(f"{PILE}/*/*")) == 2
