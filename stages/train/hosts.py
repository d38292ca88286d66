"""Ray placement of the training hosts: one actor per host, the same code on CPU, GPU, TPU.

Each ``TrainHost`` actor is one JAX process. Placement is the only difference between
platforms: on CPU, ``hosts`` local processes whose virtual devices come from ``XLA_FLAGS``
(set in the actor's environment, before JAX is imported, with the malloc settings of
``stages/train/malloc.py``) joined over 127.0.0.1 with gloo collectives; on GPU one actor
per node holding its GPUs; on TPU host 0 takes the slice's ``TPU-{type}-head`` resource and
the others the slice's own resource (its pod name), each with its chips, and
``jax.distributed.initialize()`` reads the topology from the TPU VM.

If a host dies, every host is stopped (JAX collectives cannot lose a member) and a fresh set
resumes from the last checkpoint, up to ``max_restarts`` times; then the stage fails. As
with torchrun's elastic agent or Ray Train's ``max_failures``, the group is the unit of
restart. A host counts as failed when its actor dies or its ``train`` raises a
``RuntimeError`` (what JAX's collectives and distributed runtime raise when a peer goes
away); other errors (bad data, a NaN loss, a bad config) would recur, so they fail the stage
at once. Every host must end at the same step, preempted or not.

Each attempt's actors are named ``train-host-{index}-{attempt id}`` (in the job's
namespace), so ``ray list actors`` and ``ray.get_actor`` can find a given host.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.queue import Empty, Queue

from stages.train import malloc
from stages.train.config import PlacementConfig, TrainConfig

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
"""How often the driver forwards host 0's metric records while the hosts train."""


class HostsFailed(RuntimeError):
    """The hosts died more often than ``max_restarts`` allows."""


@ray.remote(max_restarts=0)
class TrainHost:
    """One JAX process of the run."""

    def __init__(self, index: int, count: int, platform: str):
        import jax

        self.index, self.count, self.platform = index, count, platform
        if platform == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def coordinator(self) -> str:
        """An address on this node for the other processes to join (host 0 only)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        address = "127.0.0.1" if self.platform == "cpu" else ray.util.get_node_ip_address()
        return f"{address}:{port}"

    def slice_name(self) -> str:
        """The TPU pod slice this host is on (its Ray resource name)."""
        from ray.util.accelerators import tpu

        name = tpu.get_current_pod_name()
        if not name:
            raise RuntimeError("host 0 holds the TPU head resource but reports no pod name")
        return name

    def join(self, coordinator: str | None) -> int:
        """``jax.distributed.initialize``; returns the global device count."""
        import jax

        if self.platform == "tpu":
            jax.distributed.initialize()
        elif self.count > 1:
            jax.distributed.initialize(coordinator, self.count, self.index)
        return jax.device_count()

    def train(self, config: TrainConfig, tokenize: str, output: str, queue: Queue | None) -> dict:
        from stages.train.trainer import Trainer

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        trainer = Trainer(config, tokenize, output)
        sink = None if queue is None else queue.put
        result = trainer.train(sink)
        return {**result.__dict__, "losses": dict(result.losses)}


def actor_options(placement: PlacementConfig, index: int, slice_name: str | None) -> dict:
    """Ray options placing host ``index``."""
    options: dict[str, Any] = {"num_cpus": placement.cpus_per_host}
    if placement.platform == "cpu":
        flags = f"--xla_force_host_platform_device_count={placement.devices_per_host}"
        env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **malloc.ENV}
        options["runtime_env"] = {"env_vars": env}
    elif placement.platform == "gpu":
        options["num_gpus"] = placement.devices_per_host
    else:
        pinned = f"TPU-{placement.tpu_type}-head" if index == 0 else slice_name
        options["resources"] = {"TPU": placement.devices_per_host, pinned: 1}
    return options


def host_name(index: int, attempt: str) -> str:
    """The Ray actor name of host ``index`` in the attempt with id ``attempt``."""
    return f"train-host-{index}-{attempt}"


def _create(placement: PlacementConfig) -> list[Any]:
    """One attempt's host actors, named for it."""
    count, attempt = placement.hosts, uuid.uuid4().hex[:8]

    def create(index: int, slice_name: str | None) -> Any:
        options = actor_options(placement, index, slice_name)
        return TrainHost.options(name=host_name(index, attempt), **options).remote(
            index, count, placement.platform
        )

    first = create(0, None)
    slice_name = ray.get(first.slice_name.remote()) if placement.platform == "tpu" else None
    return [first, *(create(i, slice_name) for i in range(1, count))]


def _join(hosts: list[Any]) -> None:
    coordinator = ray.get(hosts[0].coordinator.remote())
    devices = ray.get([h.join.remote(coordinator) for h in hosts])
    log.info("train: %d hosts joined, %d devices", len(hosts), devices[0])


def _drain(queue: Queue, sink: Callable[[dict[str, float]], None]) -> None:
    while True:
        try:
            records = queue.get_nowait_batch(queue.qsize())
        except Empty:
            return
        if not records:
            return
        for record in records:
            sink(record)


def _host_failed(error: Exception) -> bool:
    """Whether ``error`` is a host going away (retried) rather than one that would recur."""
    if isinstance(error, RayActorError):
        return True
    return isinstance(error, RayTaskError) and isinstance(error.cause, RuntimeError)


def _agreed(results: list[dict]) -> dict:
    """Host 0's result, once every host is seen to have stopped at the same step."""
    ends = {(r["step"], r["preempted"]) for r in results}
    if len(ends) != 1:
        raise RuntimeError(f"train hosts stopped at different (step, preempted): {sorted(ends)}")
    return results[0]


def run_hosts(
    config: TrainConfig, tokenize: str, output: str, sink: Callable[[dict[str, float]], None]
) -> dict:
    """Train on ``placement.hosts`` actors; host 0's metric records go to ``sink``.
    Returns host 0's result."""
    placement = config.placement
    failure: Exception | None = None
    for attempt in range(placement.max_restarts + 1):
        queue = Queue(actor_options={"num_cpus": 0})
        hosts = _create(placement)
        results: dict[Any, dict] = {}
        try:
            _join(hosts)
            pending = [
                h.train.remote(config, tokenize, output, queue if i == 0 else None)
                for i, h in enumerate(hosts)
            ]
            while len(results) < len(pending):
                done, _ = ray.wait(
                    [r for r in pending if r not in results], num_returns=1, timeout=POLL_SECONDS
                )
                _drain(queue, sink)
                for ref in done:
                    results[ref] = ray.get(ref)
            _drain(queue, sink)
            return _agreed([results[ref] for ref in pending])
        except (RayActorError, RayTaskError) as error:
            if not _host_failed(error):
                raise
            log.warning("train: a host failed (attempt %d): %s", attempt + 1, error)
            failure = error
        finally:
            for host in hosts:
                ray.kill(host)
            ray.kill(queue.actor)
    raise HostsFailed(
        f"training hosts failed {placement.max_restarts + 1} times; the last checkpoint of "
        f"{output} is kept"
    ) from failure
