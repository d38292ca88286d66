"""The training hosts as a Ray Train ``JaxTrainer`` worker group: one worker per JAX process.

Ray Train places the workers and restarts them; what is ours is the glue:

- ``scaling_config``: the stage's placement as Ray Train's ``ScalingConfig``. On TPU the
  slice ``topology``, ``accelerator_type`` and slice count (Ray Train reserves the slices
  through ``ray.util.tpu`` and sets the multi-slice variables itself, and ``JaxConfig`` calls
  ``jax.distributed.initialize``); on GPU a worker per node with its GPUs; on CPU local
  workers whose virtual devices come from ``XLA_FLAGS`` in the workers' runtime env.
- ``worker_loop``: what every worker runs. On CPU, where ``JaxConfig`` starts no distributed
  runtime, it joins the processes itself (rank and world size from the Train context, the
  coordinator address broadcast from rank 0, gloo over 127.0.0.1). Then it runs the
  ``Trainer``, its node's system metrics sampled into the stage's MLflow run as
  ``system/host{rank}/...``; rank 0 sends its metric records to a queue the stage drains
  while training.
- ``run_hosts``: fits the trainer. A worker that dies or raises makes Ray Train restart the
  whole group (``FailureConfig(max_failures=max_restarts)``), and the new group resumes
  from the last Orbax checkpoint; past that count the stage fails naming that checkpoint.

Every worker joins JAX's distributed runtime, even alone, so a SIGTERM (a preemption notice)
to any worker reaches JAX's preemption service: every worker saves a checkpoint at the same
step and returns (``Trainer``). Orbax is the one place checkpoints are written and read;
nothing is reported to Ray Train's own checkpointing (``ray.train.report`` is a barrier
across ranks at every call, and a report without a checkpoint never reaches the result).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.v2.jax import JaxTrainer
from ray.util.queue import Empty, Queue

from pipeline import loopback, storage
from pipeline.logs import console_logging
from stages.train import malloc
from stages.train.config import PlacementConfig, TrainConfig

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
"""How often the stage forwards rank 0's metric records while the workers train."""
Sink = Callable[[dict[str, float]], None]
NodeMetrics = Callable[[str], AbstractContextManager[object]]
RUNS_DIR = "ray_train"
"""Where in the train output Ray Train keeps its run state (its storage marker only: no
checkpoint is reported to it)."""


class HostsFailed(RuntimeError):
    """The workers failed more often than ``max_restarts`` allows."""


def scaling_config(placement: PlacementConfig) -> ScalingConfig:
    """Ray Train's placement of the workers: a worker per host of ``slices`` TPU slices, a
    worker per GPU node, or ``hosts`` CPU workers."""
    if placement.platform == "tpu":
        return ScalingConfig(
            use_tpu=True,
            num_workers=placement.workers(),
            topology=placement.topology,
            accelerator_type=placement.accelerator_type,
        )
    return ScalingConfig(
        num_workers=placement.hosts,
        use_gpu=placement.platform == "gpu",
        resources_per_worker=worker_resources(placement),
    )


def worker_resources(placement: PlacementConfig) -> dict[str, float]:
    """The Ray resources one worker holds."""
    if placement.platform == "tpu":
        return {"TPU": placement.chips_per_worker()}
    if placement.platform == "gpu":
        return {"CPU": placement.cpus_per_host, "GPU": placement.devices_per_host}
    return {"CPU": placement.cpus_per_host}


def log_wait_for_resources(placement: PlacementConfig) -> None:
    """Say what the worker group asks for, and warn when the cluster cannot place it now: Ray
    Train then waits (an autoscaler may add nodes) and a person sees why nothing trains."""
    need = {k: v * placement.workers() for k, v in worker_resources(placement).items()}
    free = ray.available_resources()
    log.info("train: %d worker(s), %s in all; free now: %s", placement.workers(), need, free)
    short = {k: v for k, v in need.items() if free.get(k, 0.0) < v}
    if short:
        log.warning(
            "train: waiting for %s (free now: %s); other work holds the rest, or the cluster "
            "must grow",
            short,
            {k: free.get(k, 0.0) for k in short},
        )


def worker_env(placement: PlacementConfig) -> dict[str, str]:
    """Environment of every worker process: on CPU, its virtual devices and the malloc
    settings glibc reads at process start (``stages/train/malloc.py``)."""
    if placement.platform != "cpu":
        return {}
    flags = f"--xla_force_host_platform_device_count={placement.devices_per_host}"
    return {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **malloc.ENV}


def _join_cpu_processes() -> None:
    """``jax.distributed.initialize`` over 127.0.0.1 with gloo collectives, at the address
    rank 0 chose."""
    import jax
    import ray.train
    import ray.train.collective

    context = ray.train.get_context()
    rank = context.get_world_rank()
    chosen = f"{loopback.HOST}:{loopback.free_port()}" if rank == 0 else ""
    address = ray.train.collective.broadcast_from_rank_zero(chosen)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, context.get_world_size(), rank)


def worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One worker's run: join the JAX processes (on CPU), train, return this host's result
    once every host is seen to stop at the same step."""
    import jax
    import numpy as np
    import ray.train
    from jax.experimental import multihost_utils

    from stages.train.trainer import Trainer

    console_logging()
    config: TrainConfig = loop_config["config"]
    if config.placement.platform == "cpu":
        _join_cpu_processes()
    trainer = Trainer(config, loop_config["tokenize"], loop_config["output"])
    queue: Queue = loop_config["queue"]
    rank = ray.train.get_context().get_world_rank()
    sink = queue.put if rank == 0 else None
    with loop_config["node_metrics"](f"host{rank}"):
        result = trainer.train(sink, preemption_sync=True)
    end = np.asarray([result.step, int(result.preempted)])
    multihost_utils.assert_equal(end, "train hosts stopped at different (step, preempted)")
    log.info(
        "train: worker %d of %d done, %d devices", rank, jax.process_count(), jax.device_count()
    )
    return {**result.__dict__, "losses": dict(result.losses)}


def _drain(queue: Queue, sink: Sink) -> None:
    while True:
        try:
            records = queue.get_nowait_batch(queue.qsize())
        except Empty:
            return
        if not records:
            return
        for record in records:
            sink(record)


def _forward_until(done: threading.Event, queue: Queue, sink: Sink) -> None:
    """Forward the queue's records to ``sink`` until ``done`` is set, then what is left."""
    while not done.wait(POLL_SECONDS):
        _drain(queue, sink)
    _drain(queue, sink)


def _kept_checkpoint(output: str) -> str:
    """Which checkpoint a rerun resumes from, for the failure message."""
    from stages.train.output import checkpoint_step, checkpoints_dir
    from stages.train.params import ModelFormatError

    try:
        step = checkpoint_step(output)
    except ModelFormatError:
        return f"no checkpoint was saved in {checkpoints_dir(output)}"
    return f"the checkpoint of step {step} in {checkpoints_dir(output)} is kept"


def run_hosts(
    config: TrainConfig, tokenize: str, output: str, sink: Sink, node_metrics: NodeMetrics
) -> dict:
    """Train on the placement's workers; rank 0's metric records go to ``sink`` while they
    train, and every worker samples its node through ``node_metrics``. Returns rank 0's
    result."""
    placement = config.placement
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = JaxTrainer(
        worker_loop,
        train_loop_config={
            "config": config,
            "tokenize": tokenize,
            "output": output,
            "queue": queue,
            "node_metrics": node_metrics,
        },
        scaling_config=scaling_config(placement),
        run_config=RunConfig(
            name=f"train-{uuid.uuid4().hex[:8]}",
            storage_path=storage.absolute(storage.join(output, RUNS_DIR)),
            failure_config=FailureConfig(max_failures=placement.max_restarts),
            worker_runtime_env={"env_vars": worker_env(placement)},
        ),
    )
    log_wait_for_resources(placement)
    done = threading.Event()
    forwarder = threading.Thread(target=_forward_until, args=(done, queue, sink), daemon=True)
    forwarder.start()
    try:
        return trainer.fit().return_value
    except TrainingFailedError as error:
        raise HostsFailed(
            f"training workers failed {placement.max_restarts + 1} time(s), "
            f"{placement.max_restarts} restart(s) allowed; {_kept_checkpoint(output)}"
        ) from error
    finally:
        done.set()
        forwarder.join()
        ray.kill(queue.actor)
