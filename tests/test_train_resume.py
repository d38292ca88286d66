"""Exact resume of the training loop: 20 steps straight equal 20 steps with a SIGKILL and
a SIGTERM (preemption) in between and reruns: the same loss at every step and bitwise the
same final float32 parameters on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stages.train.config import TrainConfig
from stages.train.trainer import Trainer
from tests.train_data import write_tokenized

CONFIG = TrainConfig(
    model="gptj-tiny",
    model_overrides={"n_layers": 2, "vocab_size": 256},
    global_batch=8,
    micro_batches=2,
    steps=20,
    checkpoint_every=5,
    val_every=10,
    val_batches=2,
    optimizer={"warmup_steps": 3, "anneal_steps": 30, "lr": 3e-3, "end_lr": 3e-4},
    peak_flops_per_device=1e11,
)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tokenized(str(tmp_path_factory.mktemp("tok")), 32, {"train": 120, "val": 16})


def start(tokenized: str, output: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train.trainer", CONFIG.model_dump_json(), tokenized, output],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def read_until(process: subprocess.Popen, step: int | None) -> tuple[dict[int, float], dict]:
    """Per-step losses printed until ``step`` is done (``None``: to the end) and the result."""
    losses: dict[int, float] = {}
    assert process.stdout is not None
    for line in process.stdout:
        record = json.loads(line)
        if "result" in record:
            return losses, record["result"]
        losses[int(record["step"]) - 1] = record["loss"]
        if step is not None and record["step"] >= step:
            return losses, {}
    raise AssertionError(f"trainer exited with {process.wait()} before printing a result")


def test_kill_and_preemption_resume_to_identical_losses_and_params(
    tokenized: str, tmp_path: Path
) -> None:
    records: list[dict] = []
    straight = Trainer(CONFIG, tokenized, str(tmp_path / "straight")).train(records.append)
    assert straight.step == 20 and not straight.preempted
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[0]["lr"] == 0.0 and records[3]["lr"] == pytest.approx(3e-3)
    assert {"val_loss", "grad_norm", "tokens_per_s", "mfu"} <= set(records[9])

    out = tmp_path / "interrupted"
    first = start(tokenized, out)
    seen, _ = read_until(first, 12)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = start(tokenized, out)
    more, _ = read_until(second, 16)
    second.send_signal(signal.SIGTERM)
    tail, preempted = read_until(second, None)
    assert second.wait() == 0
    assert preempted["preempted"] and 16 <= preempted["step"] < 20
    assert preempted["resumed_from"] in (5, 10)

    third = start(tokenized, out)
    last, result = read_until(third, None)
    assert third.wait() == 0
    assert result["resumed_from"] == preempted["step"] and result["step"] == 20

    for losses in (seen, {**more, **tail}, last):
        assert losses == {s: straight.losses[s] for s in losses}
    assert set(seen) | set(more) | set(tail) | set(last) == set(range(20))
    assert result["params_sha256"] == straight.params_sha256
    assert result["val_loss"] == straight.val_loss
