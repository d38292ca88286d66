"""Conversion from and to the train stage's Orbax checkpoints: export streams the checkpoint
(the current leaf and the one read ahead) and equals the in-memory export byte for byte; an
imported Hugging Face model is a checkpoint the real trainer fine-tunes from; gs://
destinations; the ``meshline convert`` CLI; and the stage registering its export in a real
(SQLite) MLflow Model Registry, linked to the training run."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import cli, lineage, storage
from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.convert import (
    INDEX,
    ConvertConfig,
    ConvertError,
    export_hf,
    export_train_output,
    import_checkpoint,
    import_hf,
    iter_checkpoint_tensors,
    run,
)
from stages.convert.hf_dir import write_hf
from stages.train.config import TrainConfig
from stages.train.model import forward
from stages.train.model_config import preset
from stages.train.output import (
    CheckpointReader,
    load_checkpoint_params,
    read_model_config,
    write_checkpoint,
)
from stages.train.trainer import Trainer
from tests.test_convert import hf_logits, random_params, relative_error, same_tree
from tests.train_data import write_tokenized

OVERRIDES = {"n_layers": 2, "vocab_size": 256, "d_model": 64, "d_ff": 128}
TRAIN = dict(
    model="gptj-tiny",
    model_overrides=OVERRIDES,
    dtype="float32",
    global_batch=4,
    steps=2,
    checkpoint_every=1,
    val_every=2,
    val_batches=1,
    optimizer={"warmup_steps": 1, "anneal_steps": 4, "lr": 3e-3, "end_lr": 3e-4},
    peak_flops_per_device=1e11,
)


def train(tokenized: str, output: str, **changes: object) -> Trainer:
    trainer = Trainer(TrainConfig.model_validate({**TRAIN, **changes}), tokenized, output)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(train output with checkpoints at steps 1 and 2, tokenize output with a tokenizer)."""
    root = tmp_path_factory.mktemp("trained")
    tokenized = write_tokenized(str(root / "tok"), 16, {"train": 32, "val": 8})
    os.makedirs(os.path.join(tokenized, "tokenizer"))
    with open(os.path.join(tokenized, "tokenizer", "tokenizer.json"), "w") as f:
        f.write('{"model": {}}')
    output = str(root / "train")
    trainer = train(tokenized, output)
    with open(os.path.join(output, "model_config.json"), "w") as f:
        f.write(trainer.model.model_dump_json())
    return output, tokenized


def files_of(directory: str) -> dict[str, bytes]:
    return {
        uri[len(directory.rstrip("/")) + 1 :]: storage.read_bytes(uri)
        for uri in storage.list_files(directory)
    }


def test_streamed_export_equals_the_in_memory_one(trained: tuple[str, str], tmp_path: Path):
    output, tokenized = trained
    config = read_model_config(output)
    params = load_checkpoint_params(output)
    streamed = tmp_path / "streamed"
    summary = export_train_output(output, str(streamed), max_shard_bytes=50_000)
    in_memory = export_hf(params, config, str(tmp_path / "mem"), max_shard_bytes=50_000)
    assert files_of(str(streamed)) == files_of(in_memory)
    assert summary.shards > 1 and summary.bytes == sum(a.nbytes for a in jax.tree.leaves(params))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    ours = np.asarray(forward(config, params, tokens))
    assert relative_error(ours, hf_logits(str(streamed), tokens)) <= 1e-5

    export_train_output(output, str(tmp_path / "step1"), step=1)
    back, _ = import_hf(str(tmp_path / "step1"))
    assert same_tree(back, load_checkpoint_params(output, step=1))
    assert not same_tree(back, params)
    with pytest.raises(ConvertError, match="step 3"):
        export_train_output(output, str(tmp_path / "step3"), step=3)
    assert not (tmp_path / "step3").exists()

    broken = {**params, "ln_f": {"scale": params["ln_f"]["scale"]}}
    write_checkpoint(broken, config, str(tmp_path / "broken"))
    with pytest.raises(ConvertError, match="ln_f/bias is missing"):
        export_train_output(str(tmp_path / "broken"), str(tmp_path / "hf-broken"))
    assert sorted(os.listdir(tmp_path)) == ["broken", "mem", "step1", "streamed"]


class WatchedReader(CheckpointReader):
    """Records whether any earlier leaf was still alive when a leaf was read."""

    def __init__(self, *args: object):
        super().__init__(*args)
        self.returned: list[weakref.ref] = []
        self.alive_at_read: list[int] = []

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        self.alive_at_read.append(sum(ref() is not None for ref in self.returned))
        leaf = super().read(path)
        self.returned.append(weakref.ref(leaf))
        return leaf


def test_export_holds_the_current_and_the_next_leaf_only(trained: tuple[str, str], tmp_path: Path):
    output, _ = trained
    config = read_model_config(output)
    with WatchedReader(output, None) as reader:
        tensors = iter_checkpoint_tensors(config, reader)
        write_hf(config, tensors, lambda name: (tmp_path / name).open("wb"), max_shard_bytes=1)
    # GPT-J's rules take one leaf each: while the next is read ahead, the current one may
    # still be being written (or already dropped); no other leaf is alive.
    assert len(reader.returned) == len(reader.shapes()) > 10
    assert max(reader.alive_at_read) <= 1


def test_imported_model_fine_tunes_from_its_exact_weights(trained: tuple[str, str], tmp_path):
    _, tokenized = trained
    config = preset("gptj-tiny", **OVERRIDES, dtype="float32", param_dtype="float32")
    params = random_params(config)
    hf = export_hf(params, config, str(tmp_path / "hf"), dtype="bfloat16")
    imported = str(tmp_path / "imported")
    assert import_checkpoint(hf, imported).param_dtype == "float32"
    rounded = jax.tree.map(lambda a, b: np.asarray(b, np.float32), params, import_hf(hf)[0])
    assert same_tree(load_checkpoint_params(imported), rounded)

    again = str(tmp_path / "again")
    export_train_output(imported, again, dtype="bfloat16")
    assert files_of(again) == files_of(hf)

    tuned = str(tmp_path / "tuned")
    train(tokenized, tuned, init_from=imported, steps=2, checkpoint_every=1)
    # The schedule's first update has learning rate 0: step 1 holds the initial params.
    assert same_tree(load_checkpoint_params(tuned, step=1), rounded)
    assert not same_tree(load_checkpoint_params(tuned, step=2), rounded)


def test_export_to_and_import_from_gcs(trained: tuple[str, str], gcs_bucket: str, tmp_path):
    output, tokenized = trained
    dest = f"{gcs_bucket}/models/tiny"
    export_train_output(output, dest, max_shard_bytes=50_000, tokenize_output=tokenized)
    names = sorted(files_of(dest))
    assert INDEX in names and "tokenizer.json" in names and "config.json" in names
    back, config = import_hf(dest)
    assert config == read_model_config(output)
    assert same_tree(back, load_checkpoint_params(output))
    import_checkpoint(dest, str(tmp_path / "ckpt"))
    assert same_tree(load_checkpoint_params(str(tmp_path / "ckpt")), back)

    with pytest.raises(FileExistsError, match=dest):
        export_train_output(output, dest)
    without_tokenizer = tmp_path / "tok"
    without_tokenizer.mkdir()
    (without_tokenizer / "manifest.json").write_bytes(Path(tokenized, "manifest.json").read_bytes())
    failed = f"{gcs_bucket}/models/failed"
    with pytest.raises(ConvertError, match="no tokenizer.json"):
        export_train_output(output, failed, tokenize_output=str(without_tokenizer))
    assert storage.list_files(failed) == []


def test_cli_exports_and_imports_and_names_bad_paths(
    trained: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    output, tokenized = trained
    dest = str(tmp_path / "hf")
    argv = ["convert", "export", output, dest, "--step", "1", "--dtype", "bfloat16"]
    assert cli.main([*argv, "--tokenizer", tokenized]) == 0
    assert "tensors" in capsys.readouterr().out
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["dtype"], hf_config["eos_token_id"]) == ("bfloat16", 255)
    assert cli.main(["convert", "import", dest, str(tmp_path / "ckpt")]) == 0
    step1 = load_checkpoint_params(output, step=1)
    rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), step1)
    assert same_tree(load_checkpoint_params(str(tmp_path / "ckpt")), rounded)

    assert cli.main(["convert", "export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert cli.main(["convert", "import", tokenized, str(tmp_path / "y")]) == 2
    assert os.path.join(tokenized, "config.json") in capsys.readouterr().err
    assert cli.main(["convert", "export", output, dest]) == 2
    assert f"{dest} exists" in capsys.readouterr().err


def test_stage_exports_and_registers_the_model_linked_to_the_training_run(
    trained: tuple[str, str], tmp_path: Path
):
    output, tokenized = trained
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = lineage.create_experiment(tracking, "convert-test", str(tmp_path / "artifacts"))
    parent = lineage.PipelineRun.start(tracking, experiment, "inv", "test")
    with parent.stage_run("train", "trainfp", output, {}, []) as train_run:
        train_run_id = train_run.run_id
    out = tmp_path / "convert"
    upstream = {
        "train": Upstream("train", output, "trainfp", "traindigest", run_id=train_run_id),
        "tokenize": Upstream("tokenize", tokenized, "tokfp", "tokdigest"),
    }
    with parent.stage_run("convert", "convfp", str(out), {}, list(upstream.values())) as run_:
        ctx = StageContext(
            name="convert",
            config=ConvertConfig(max_shard_bytes=50_000),
            output=str(out),
            inputs=upstream,
            ledger=Ledger(str(out)),
            metric_sink=run_.log_metrics,
            register_model=run_.register_model,
        )
        run(ctx)
    assert ctx.ledger.is_committed("model") and ctx.metrics["export_bytes"] > 0
    assert json.loads((out / "model" / "config.json").read_text())["eos_token_id"] == 255
    version = MlflowClient(tracking).get_model_version("convert-test", "1")
    assert version.tags[lineage.TAG_SOURCE] == (out / "model").as_uri()
    assert version.run_id == train_run.run_id
    assert version.tags["meshline.output_digest"] == ctx.ledger.digest()
    assert version.tags["meshline.tokenize_digest"] == "tokdigest"
    assert version.tags[lineage.TAG_REGISTERED_BY] == run_.run_id
