"""Failures of one host in a 2-host run (a Ray Train worker group of 2 workers x 2 virtual CPU
devices, jax.distributed over 127.0.0.1): SIGTERM to one worker stops both at one agreed step
with a checkpoint; in the rerun a worker process killed with SIGKILL restarts the whole group
from the last checkpoint; the run ends with parameters bit-identical to an uninterrupted
run's and the same loss at every step. A group that fails more often than ``max_restarts``
fails the stage, naming the checkpoint a rerun resumes from."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import ray
from mlflow import MlflowClient

from pipeline import lineage
from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.train.config import TrainConfig
from stages.train.hosts import HostsFailed
from stages.train.stage import Preempted, run
from tests.conftest import wait_for_free_cpus
from tests.train_data import write_tokenized

STEPS = 32
EVERY = 4
CONFIG = TrainConfig(
    model="gptj-tiny",
    model_overrides={"n_layers": 1, "vocab_size": 256},
    mesh={"data": 2, "fsdp": -1, "model": 1},
    placement={"hosts": 2, "devices_per_host": 2, "cpus_per_host": 1, "max_restarts": 1},
    global_batch=8,
    micro_batches=2,
    steps=STEPS,
    checkpoint_every=EVERY,
    val_every=STEPS,
    val_batches=1,
    optimizer={"warmup_steps": 2, "anneal_steps": 30, "lr": 3e-3, "end_lr": 3e-4},
    peak_flops_per_device=1e11,
    dtype="float32",
)
"""Tiny: the file starts four host groups on two cores (sharing a compilation cache)."""
Sink = Callable[[dict[str, float]], None]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tokenized(str(tmp_path_factory.mktemp("tok")), 16, {"train": 120, "val": 8})


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    return CONFIG.model_copy(update={"compilation_cache": str(tmp_path_factory.mktemp("xla"))})


def train(config: TrainConfig, tokenized: str, out: Path, sink: Sink, **context: Callable) -> dict:
    """One run of the train stage into ``out``; its summary. ``sink`` gets the step records;
    ``context`` adds fields of the stage context."""

    def steps_only(metrics: dict[str, float]) -> None:
        if "step" in metrics:
            sink(metrics)

    ctx = StageContext(
        name="train",
        config=config,
        output=str(out),
        inputs={"tokenize": Upstream("tokenize", tokenized, "fp", "digest")},
        ledger=Ledger(str(out)),
        metric_sink=steps_only,
        **context,
    )
    run(ctx)
    return json.loads((out / "summary.json").read_text())


class Straight(NamedTuple):
    summary: dict
    losses: dict[int, float]
    """The loss of each step."""
    system_metrics: set[str]
    """The names of the system metrics the run's MLflow run holds."""


@pytest.fixture(scope="module")
def straight(
    ray_cluster: None, config: TrainConfig, tokenized: str, tmp_path_factory: pytest.TempPathFactory
) -> Straight:
    """An uninterrupted run, tracked in an MLflow run of its own."""
    wait_for_free_cpus(2)
    out = tmp_path_factory.mktemp("straight")
    tracking = f"sqlite:///{out}/mlflow.db"
    experiment = lineage.create_experiment(tracking, "hosts", str(out / "mlruns"))
    pipeline = lineage.PipelineRun.start(tracking, experiment, "test", "test")
    logged: list[dict[str, float]] = []
    with pipeline.stage_run("train", "fp", str(out / "train"), {}, []) as tracked:
        metrics = functools.partial(lineage.system_metrics, tracking, tracked.run_id)
        summary = train(config, tokenized, out / "train", logged.append, node_metrics=metrics)
    assert [int(r["step"]) for r in logged] == list(range(1, STEPS + 1))
    system = MlflowClient(tracking).get_run(tracked.run_id).data.metrics
    return Straight(
        summary, {int(r["step"]): r["loss"] for r in logged}, {m for m in system if "/" in m}
    )


def test_every_host_samples_its_node_into_the_stage_run(straight: Straight) -> None:
    for host in ("host0", "host1"):
        assert f"system/{host}/cpu_utilization_percentage" in straight.system_metrics, host
    assert "system/cpu_utilization_percentage" in straight.system_metrics


def a_worker_pid() -> int:
    """The process id of one live Ray Train worker of the run (the last one started)."""
    table = ray._private.state.actors(actor_state_name="ALIVE")
    pids = [int(i["Pid"]) for i in table.values() if i["ActorClassName"] == "RayTrainWorker"]
    assert len(pids) == 2, table
    return max(pids)


def check_losses(logged: list[dict[str, float]], expected: dict[int, float]) -> None:
    for record in logged:
        assert record["loss"] == expected[int(record["step"])], record["step"]


def test_sigterm_to_one_host_then_a_killed_host_resume_to_identical_params(
    straight: Straight, config: TrainConfig, tokenized: str, tmp_path: Path
) -> None:
    out = tmp_path / "train"
    logged: list[dict[str, float]] = []

    def preempt_host_1(record: dict[str, float]) -> None:
        logged.append(record)
        if record["step"] == 5:
            os.kill(a_worker_pid(), signal.SIGTERM)

    with pytest.raises(Preempted, match=r"preempted at step \d+") as stopped:
        train(config, tokenized, out, preempt_host_1)
    step = int(re.search(r"step (\d+)", str(stopped.value)).group(1))
    # Both hosts stopped at the step they agreed on (every worker checks every host's end)
    # and saved it; a host that stopped alone would have left the other in a collective.
    assert 5 < step < STEPS and int(logged[-1]["step"]) == step
    saved = sorted(int(s) for s in os.listdir(out / "checkpoints"))
    assert saved[-1] == step and all(s % EVERY == 0 for s in saved[:-1])
    assert not (out / "summary.json").exists()
    check_losses(logged, straight.losses)

    # The rerun resumes there; host 1 is killed once the first checkpoint after it is
    # surely complete (saving the next one waited for it), and the group restarts from it.
    complete = (step // EVERY + 1) * EVERY
    rerun: list[dict[str, float]] = []
    killed: list[int] = []

    def kill_host_1(record: dict[str, float]) -> None:
        rerun.append(record)
        if not killed and record["step"] > complete + EVERY:
            killed.append(a_worker_pid())
            os.kill(killed[-1], signal.SIGKILL)

    summary = train(config, tokenized, out, kill_host_1)
    assert killed and summary == straight.summary
    steps = [int(r["step"]) for r in rerun]
    assert steps[0] == step + 1 and steps[-1] == STEPS
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] - 1 >= complete and (steps[restart] - 1) % EVERY == 0
    check_losses(rerun, straight.losses)


def test_a_group_failing_past_max_restarts_names_the_checkpoint_kept(
    straight: Straight, config: TrainConfig, tokenized: str, tmp_path: Path
) -> None:
    out = tmp_path / "train"
    no_restarts = config.model_copy(
        update={"placement": config.placement.model_copy(update={"max_restarts": 0})}
    )
    killed: list[int] = []

    def kill_after_a_checkpoint(record: dict[str, float]) -> None:
        if not killed and record["step"] > 2 * EVERY:
            killed.append(a_worker_pid())
            os.kill(killed[-1], signal.SIGKILL)

    with pytest.raises(HostsFailed, match=r"failed 1 time\(s\), 0 restart") as failed:
        train(no_restarts, tokenized, out, kill_after_a_checkpoint)
    saved = max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())
    assert saved >= EVERY and killed
    assert f"the checkpoint of step {saved} in {out / 'checkpoints'} is kept" in str(failed.value)
