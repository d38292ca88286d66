"""The tokenize stage on a real local Ray cluster, from hand-written dedup-style Parquet parts:
GPT-J packing (every id once, rows of seq_len+1, EOS between documents), the manifest, the
memory-mapped reader, identical bytes for 1 and 2 workers and after an interrupted run,
a trained BPE, and errors that name the bad file or document."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.tokenize import ShardDataset, TokenizeConfig, load_tokenizer, read_manifest, run
from stages.tokenize.bpe import load_gpt2
from stages.tokenize.config import PILE_EPOCHS
from stages.tokenize.manifest import missing_components
from stages.tokenize.stage import TokenizeError
from tests.tokenize_data import ADVERSARIAL, gpt2_ranks_path, stdlib_texts, write_part

SEQ_LEN = 127
ROW = SEQ_LEN + 1
COMPONENTS = ("Github", "Pile-CC", "DM Mathematics")


def documents(split: str, part: int, count: int, offset: int) -> list[tuple[str, str, str]]:
    texts = stdlib_texts(count, offset)
    return [
        (text, COMPONENTS[i % 3], f"{split}/{part:02d}.jsonl.zst:{i + 1}")
        for i, text in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def dedup(tmp_path_factory) -> str:
    """train: three parts (the second empty, the third with adversarial text and one long
    document); val and test: one part each."""
    root = tmp_path_factory.mktemp("dedup")
    write_part(str(root / "train/part-00000.parquet"), documents("train", 0, 25, 0))
    write_part(str(root / "train/part-00001.parquet"), [])
    odd = [(t, "Pile-CC", f"train/02.jsonl.zst:{i + 1}") for i, t in enumerate(ADVERSARIAL)]
    long_document = ("\n".join(stdlib_texts(30, 60)), "Github", "train/02.jsonl.zst:999")
    rows = documents("train", 2, 20, 25) + odd + [long_document]
    write_part(str(root / "train/part-00002.parquet"), rows)
    write_part(str(root / "val/part-00000.parquet"), documents("val", 0, 6, 45))
    write_part(str(root / "test/part-00000.parquet"), documents("test", 0, 6, 51))
    return str(root)


def context(output, dedup_uri, **config) -> StageContext:
    settings = {"tokenizer": {"kind": "gpt2", "source": gpt2_ranks_path()}, "seq_len": SEQ_LEN}
    settings.update(config)
    return StageContext(
        name="tokenize",
        config=TokenizeConfig.model_validate(settings),
        output=str(output),
        inputs={"dedup": Upstream("dedup", dedup_uri, "fp", "digest")},
        ledger=Ledger(str(output)),
    )


def run_stage(output, dedup_uri, **config) -> StageContext:
    ctx = context(output, dedup_uri, **config)
    run(ctx)
    return ctx


def expected_stream(dedup_uri: str, split: str, tokenizer) -> tuple[np.ndarray, dict]:
    """Every document of the split encoded on its own, each followed by EOS, in order."""
    ids, per_component = [], {}
    for path in storage.glob(storage.join(dedup_uri, split, "part-*.parquet")):
        table = pq.read_table(path)
        for text, name in zip(
            table.column("text").to_pylist(), table.column("pile_set_name").to_pylist(), strict=True
        ):
            encoded = tokenizer.encode(text) + [tokenizer.eos_id]
            ids.extend(encoded)
            per_component[name] = per_component.get(name, 0) + len(encoded)
    return np.array(ids, dtype=np.uint16), per_component


@pytest.fixture(scope="module")
def one_worker(ray_cluster, dedup, tmp_path_factory):
    output = tmp_path_factory.mktemp("one") / "tokenize-abc"
    ctx = run_stage(output, dedup, workers_min=1, workers_max=1, batch_rows=8, chunk_chars=4096)
    return str(output), ctx


def test_packing_keeps_every_id_once_in_rows_of_seq_len_plus_one(one_worker, dedup):
    output, ctx = one_worker
    manifest = read_manifest(output)
    tokenizer = load_tokenizer(output)
    assert manifest["dtype"] == "uint16" and manifest["row_len"] == ROW
    assert manifest["tokenizer"]["fingerprint"] == load_gpt2(gpt2_ranks_path()).fingerprint
    for split in ("train", "val", "test"):
        expected, per_component = expected_stream(dedup, split, tokenizer)
        entry = manifest["splits"][split]
        dataset = ShardDataset.from_output(output, split)
        rows = np.stack([dataset[i] for i in range(len(dataset))])
        assert rows.shape == (entry["rows"], ROW)
        shards = entry["shards"]
        last_carry = os.path.join(output, split, f"carry-{len(shards) - 1:05d}.bin")
        dropped = np.fromfile(last_carry, dtype=np.uint16)
        assert len(dropped) == entry["tokens_dropped"] < ROW
        # The rows then the dropped remainder are exactly the documents + EOS, in order.
        assert np.array_equal(np.concatenate([rows.reshape(-1), dropped]), expected)
        assert entry["tokens"] == len(expected)
        assert {n: c["tokens"] for n, c in entry["components"].items()} == per_component
        schema = pa.ipc.open_file(os.path.join(output, shards[0]["path"])).schema
        assert schema.field("tokens").type == pa.list_(pa.uint16(), ROW)
    train = manifest["splits"]["train"]
    assert [s["path"] for s in train["shards"]] == [f"train/shard-{i:05d}.arrow" for i in range(3)]
    assert train["shards"][1]["rows"] == 0  # the empty part passes its carry on
    assert train["documents"] == 25 + 20 + len(ADVERSARIAL) + 1
    assert (
        ctx.metrics["train.tokens.DM Mathematics"]
        == train["components"]["DM Mathematics"]["tokens"]
    )


def test_reader_gives_zero_copy_views_of_any_global_row(one_worker):
    output, _ = one_worker
    dataset = ShardDataset.from_output(output, "train")
    shards = read_manifest(output)["splits"]["train"]["shards"]
    last = shards[-1]
    row = dataset[last["first_row"] + 1]
    direct = pa.ipc.open_file(os.path.join(output, last["path"])).get_batch(0)
    assert np.array_equal(row, direct.column(0)[1].values.to_numpy())
    assert not row.flags.owndata and not row.flags.writeable
    assert np.array_equal(dataset[-1], dataset[len(dataset) - 1])
    assert dataset.take([0, 3]).shape == (2, ROW)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def digest_and_bytes(output: str) -> tuple[str, dict[str, bytes]]:
    files = {
        os.path.relpath(path, output): storage.read_bytes(path)
        for path in storage.list_files(output)
        if "/_meta/" not in path
    }
    return Ledger(output).digest(), files


def test_two_workers_give_identical_bytes(one_worker, dedup, tmp_path):
    output, _ = one_worker
    ctx = run_stage(tmp_path / "two", dedup, workers_min=2, workers_max=2, batch_rows=4)
    assert ctx.metrics["workers"] == 2
    assert digest_and_bytes(str(tmp_path / "two")) == digest_and_bytes(output)


def test_interrupted_run_resumes_to_identical_bytes(one_worker, dedup, tmp_path):
    output, _ = one_worker
    resumed = str(tmp_path / "resumed")
    shutil.copytree(output, resumed)
    ledger = Ledger(resumed)
    kept = ledger.record("train/shard-00000")
    # What a kill after the first part leaves: later units uncommitted, a temp file behind.
    for unit in ("train/shard-00001", "train/shard-00002", "val/shard-00000", "manifest"):
        for entry in ledger.record(unit)["files"]:
            os.remove(os.path.join(resumed, entry["path"]))
        os.remove(os.path.join(resumed, "_meta/units", unit.replace("/", "__") + ".json"))
    (tmp_path / "resumed/train/.tmp-shard-00002.arrow").write_bytes(b"partial")
    ctx = run_stage(resumed, dedup, workers_min=1, workers_max=2, batch_rows=8)
    assert ledger.record("train/shard-00000") == kept
    assert ctx.metrics["documents_encoded"] == 20 + len(ADVERSARIAL) + 1 + 6
    assert digest_and_bytes(resumed) == digest_and_bytes(output)


def test_output_on_gcs_has_the_same_bytes(one_worker, dedup, gcs_bucket):
    output, _ = one_worker
    remote = f"{gcs_bucket}/tokenize-abc"
    run_stage(remote, dedup, splits=["train", "val", "test"], workers_max=2, batch_rows=8)
    assert Ledger(remote).digest() == Ledger(output).digest()
    assert load_tokenizer(remote).fingerprint == load_tokenizer(output).fingerprint


def test_trained_tokenizer_stage(ray_cluster, dedup, tmp_path):
    config = {
        "tokenizer": {"kind": "train", "vocab_size": 700, "whitespace_tokens": 4, "sample_mb": 0.5},
        "splits": ["train", "val"],
    }
    ctx = run_stage(tmp_path / "out", dedup, **config)
    output = str(tmp_path / "out")
    manifest = read_manifest(output)
    tokenizer = load_tokenizer(output)
    assert manifest["tokenizer"] == {
        "kind": "train",
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": 700,
        "path": "tokenizer",
    }
    assert manifest["eos_id"] == tokenizer.eos_id == 0 and set(manifest["splits"]) == {
        "train",
        "val",
    }
    expected, _ = expected_stream(dedup, "val", tokenizer)
    rows = ShardDataset.from_output(output, "val")
    assert np.array_equal(rows.take(range(len(rows))).reshape(-1), expected[: len(rows) * ROW])
    assert ctx.metrics["val.rows"] == len(rows)
    # A second run of a finished output does nothing.
    before = digest_and_bytes(output)
    run_stage(tmp_path / "out", dedup, **config)
    assert digest_and_bytes(output) == before


def test_mixture_packs_each_component_into_its_own_shards(ray_cluster, dedup, tmp_path):
    output = str(tmp_path / "out")
    ctx = run_stage(output, dedup, splits=["train"], mixture="pile", batch_rows=4)
    manifest = read_manifest(output)
    tokenizer = load_tokenizer(output)
    mixture = manifest["mixture"]
    assert mixture["DM Mathematics"]["epochs"] == 2.0 and mixture["Github"]["epochs"] == 1.0
    assert sum(c["weight"] for c in mixture.values()) == pytest.approx(1.0)
    assert mixture["Books3"]["weight"] == 0.0 and mixture["Books3"]["missing"]
    assert missing_components(manifest) == sorted(set(PILE_EPOCHS) - set(COMPONENTS))
    train = manifest["splits"]["train"]
    for name in COMPONENTS:
        expected = []
        for path in storage.glob(storage.join(dedup, "train", "part-*.parquet")):
            table = pq.read_table(path)
            for text, component in zip(
                *(table.column(c).to_pylist() for c in ("text", "pile_set_name")), strict=True
            ):
                if component == name:
                    expected.extend([*tokenizer.encode(text), tokenizer.eos_id])
        entry = train["components"][name]
        rows = ShardDataset.from_output(output, "train", name)
        assert entry["directory"] == name.lower().replace(" ", "-")
        assert entry["shards"][0]["path"] == f"train/{entry['directory']}/shard-00000.arrow"
        packed = rows.take(range(len(rows))).reshape(-1)
        assert len(packed) + entry["tokens_dropped"] == len(expected) == entry["tokens"]
        assert np.array_equal(packed, np.array(expected[: len(packed)], dtype=np.uint16))
    assert (
        ctx.metrics["train.rows"]
        == train["rows"]
        == sum(train["components"][n]["rows"] for n in COMPONENTS)
    )
    with pytest.raises(KeyError, match="pick one of"):
        ShardDataset.from_output(output, "train")
    with pytest.raises(
        TokenizeError, match=r"is '(Github|DM Mathematics)', which the mixture gives no epochs"
    ):
        run_stage(tmp_path / "other", dedup, splits=["train"], mixture={"Pile-CC": 1.0})


def test_bad_input_errors_name_the_file_and_document(ray_cluster, tmp_path):
    dedup = tmp_path / "dedup"
    write_part(str(dedup / "train/part-00000.parquet"), [("ok", "Github", "train/00.jsonl.zst:1")])
    with pytest.raises(TokenizeError, match=r"no val/part-\*.parquet"):
        run_stage(tmp_path / "a", str(dedup))
    write_part(
        str(dedup / "train/part-00001.parquet"),
        [("fine", "Github", "train/00.jsonl.zst:2"), (None, "Github", "train/00.jsonl.zst:3")],
    )
    with pytest.raises(
        TokenizeError, match=r"part-00001.parquet: document 'train/00.jsonl.zst:3' has a null text"
    ):
        run_stage(tmp_path / "b", str(dedup), splits=["train"])
    assert not Ledger(str(tmp_path / "b")).is_committed("train/shard-00001")
    pq.write_table(
        pa.table({"text": ["x"], "doc_id": ["d"]}), str(dedup / "train/part-00001.parquet")
    )
    with pytest.raises(
        TokenizeError, match=r"part-00001.parquet: needs a string column 'pile_set_name'"
    ):
        run_stage(tmp_path / "c", str(dedup), splits=["train"])
