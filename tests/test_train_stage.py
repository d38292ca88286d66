"""The train stage on Ray Train: 2 workers x 2 virtual CPU devices joined by
jax.distributed over 127.0.0.1 train like 1 process x 4 devices on the same data, log
metrics through the stage context, and write the model config and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.train.config import TrainConfig
from stages.train.model_config import ModelConfig
from stages.train.stage import run
from tests.conftest import wait_for_free_cpus
from tests.train_data import write_tokenized

CONFIG = dict(
    model="gptj-tiny",
    model_overrides={"n_layers": 2, "vocab_size": 256},
    mesh={"data": 2, "fsdp": -1, "model": 1},
    global_batch=8,
    micro_batches=2,
    steps=6,
    checkpoint_every=3,
    val_every=3,
    val_batches=2,
    optimizer={"warmup_steps": 2, "anneal_steps": 30, "lr": 3e-3, "end_lr": 3e-4},
    peak_flops_per_device=1e11,
    dtype="float32",
)


def single_process(config: TrainConfig, tokenized: str, out: Path) -> dict[int, float]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-m", "stages.train.trainer", config.model_dump_json(), tokenized, out],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return {r["step"]: r["loss"] for r in records if "step" in r}


def test_two_hosts_of_two_devices_train_like_one_of_four(ray_cluster: None, tmp_path: Path) -> None:
    tokenized = write_tokenized(str(tmp_path / "tok"), 32, {"train": 120, "val": 16})
    two_hosts = TrainConfig.model_validate(
        {**CONFIG, "placement": {"hosts": 2, "devices_per_host": 2, "cpus_per_host": 1}}
    )
    logged: list[dict[str, float]] = []
    out = tmp_path / "train"
    ctx = StageContext(
        name="train",
        config=two_hosts,
        output=str(out),
        inputs={"tokenize": Upstream("tokenize", tokenized, "fp", "digest")},
        ledger=Ledger(str(out)),
        metric_sink=logged.append,
    )
    wait_for_free_cpus(2)
    run(ctx)
    steps = [r for r in logged if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6 and ctx.metrics["final_val_loss"] == summary["val_loss"]
    model = ModelConfig.model_validate_json((out / "model_config.json").read_text())
    assert (model.n_layers, model.vocab_size, model.param_dtype) == (2, 256, "float32")
    assert sorted(os.listdir(out / "checkpoints")) == ["3", "6"]

    one = single_process(TrainConfig.model_validate(CONFIG), tokenized, tmp_path / "one")
    for record in steps:
        assert record["loss"] == pytest.approx(one[record["step"]], rel=1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"]
