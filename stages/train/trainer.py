"""The training loop one host runs: mesh, sharded state, loader, checkpoints, metrics.

Every host (JAX process) runs ``train`` with its own ``process_index``; together they form
one global mesh. State (params, optimiser state, RNG) is saved with Orbax every
``checkpoint_every`` steps together with the step and the loader position (in the format of
``stages.train.output``), and a run finds its latest checkpoint and continues from it: the
batches, the updates and therefore the final parameters are the same as an uninterrupted
run's (bitwise on CPU). SIGTERM (a preemption notice) to any host finishes the current step,
and then all hosts save at one step they agree on and return.

``python -m stages.train.trainer CONFIG_JSON TOKENIZE_DIR OUTPUT_DIR`` runs one
single-process host and prints one JSON line of metrics per step (the tests kill it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from stages.tokenize import read_manifest
from stages.train import optim, sharding
from stages.train.compile_cache import use_compilation_cache
from stages.train.config import TrainConfig, training_model_config
from stages.train.loader import Loader, Position, load_split, validation_batches
from stages.train.mfu import flops_per_token, peak_flops
from stages.train.output import (
    checkpoints_dir,
    restore_checkpoint,
    restore_params,
    save_checkpoint,
    train_output_of,
)

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, float]], None]


@dataclass
class TrainResult:
    """What a host reports when its loop ends."""

    step: int
    """Steps done (the checkpoint saved last is at this step)."""
    preempted: bool
    resumed_from: int
    train_loss: float
    val_loss: float
    params_sha256: str
    """Digest of the final float32 parameters (same on every host)."""
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step this run did."""


def _process_columns(batch_sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The batch columns this process's devices hold; the loader must hand it those."""
    columns = {
        (index[1].start or 0, shape[1] if index[1].stop is None else index[1].stop)
        for index in batch_sharding.addressable_devices_indices_map(shape).values()
    }
    start, stop = min(c[0] for c in columns), max(c[1] for c in columns)
    return slice(start, stop)


@dataclass(frozen=True)
class _Meter:
    """Throughput and MFU of a step from its duration."""

    tokens_per_step: int
    flops_per_step: float
    peak_flops: float
    """FLOP/s of all devices together (configured, or measured on each host)."""

    def record(self, seconds: float) -> dict[str, float]:
        return {
            "step_time": seconds,
            "tokens_per_s": self.tokens_per_step / seconds,
            "mfu": self.flops_per_step / seconds / self.peak_flops,
        }


@dataclass
class _Progress:
    """What a run's loop has done so far."""

    step: int
    meter: _Meter
    """How a step's throughput is measured."""
    preempted: bool = False
    train_loss: float = math.nan
    val_loss: float = math.nan
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step this run did."""

    def done(self, loss: float, seconds: float) -> dict[str, float]:
        """Count a finished step with its loss; its step number, time and throughput."""
        self.losses[self.step] = self.train_loss = loss
        self.step += 1
        return {"step": self.step, **self.meter.record(seconds)}


def _digest(params: dict) -> str:
    sha = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        value = multihost_utils.process_allgather(leaf, tiled=True)
        sha.update(jax.tree_util.keystr(path).encode())
        sha.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    return sha.hexdigest()


class _Preemption:
    """Decides before each step whether to save and stop for a preemption notice (SIGTERM).

    A process on its own (``python -m stages.train.trainer``): its own SIGTERM handler. A
    process that joined ``jax.distributed`` (every Ray Train worker, even alone): JAX's
    preemption sync service, whose SIGTERM handler ``jax.distributed.initialize`` installed
    (so none is installed here, which would replace it): the host that gets the signal tells the
    coordinator, and ``reached_preemption_sync_point`` turns true on every host at the same
    step, one past the furthest any host had reached. All hosts then save the same checkpoint
    and stop together; none is left waiting in a collective for a host that has gone.
    """

    def __init__(self, sync: bool) -> None:
        self.requested = threading.Event()
        self._previous = None
        self._shared = sync or jax.process_count() > 1
        if not self._shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step")
        self.requested.set()

    def due(self, step: int) -> bool:
        """Whether to save and stop before ``step``; every host must ask at every step."""
        if self._shared:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested.is_set()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """One host's share of a training run (see the module docstring)."""

    def __init__(self, config: TrainConfig, tokenize_dir: str, output: str):
        self.config = config
        self.output = output
        use_compilation_cache(config.compilation_cache)
        manifest = read_manifest(tokenize_dir)
        self.seq_len = int(manifest["seq_len"])
        self.model = training_model_config(config, int(manifest["tokenizer"]["vocab_size"]))
        slices = config.placement.slices
        per_slice = config.mesh.resolve(jax.device_count() // slices)
        self.mesh = sharding.make_mesh(*per_slice, slices=slices)
        self.tx = optim.optimizer(config.optimizer, config.micro_batches)
        self.learning_rate = optim.schedule(config.optimizer)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows_sharding = sharding.micro_batch_sharding(self.mesh)
        self.val_sharding = sharding.batch_sharding(self.mesh)
        micro = config.global_batch // config.micro_batches
        self.rows_shape = (config.micro_batches, micro, self.seq_len + 1)
        self.train_data, self.mixture = load_split(tokenize_dir, "train")
        val_data, val_mixture = load_split(tokenize_dir, "val")
        self.val_rows = validation_batches(val_data, micro, config.val_batches, val_mixture)
        self.columns = _process_columns(self.rows_sharding, self.rows_shape)
        self._compile()

    def _compile(self) -> None:
        # In the context initial_state runs in, so that the shardings' logical axes, the state's
        # shapes and the initial state all come from one trace of the model.
        with sharding.activation_sharding(self.mesh):
            self.param_shardings = sharding.param_shardings(self.model, self.mesh)
            init = partial(sharding.init_sharded, self.model, self.mesh)
            params = jax.eval_shape(init, _key(0))
        opt_state = jax.eval_shape(self.tx.init, params)
        self.opt_shardings = optax.tree_map_params(
            self.tx,
            lambda _, s: s,
            opt_state,
            self.param_shardings,
            transform_non_params=lambda _: self.replicated,
        )
        # The whole state's shapes, dtypes and shardings: what a checkpoint restores into.
        shapes = {
            "params": params,
            "opt_state": opt_state,
            "rng": jax.eval_shape(lambda: jax.random.key_data(_key(0))),
        }
        shardings = {
            "params": self.param_shardings,
            "opt_state": self.opt_shardings,
            "rng": self.replicated,
        }
        self.abstract_state = jax.tree.map(
            lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
            shapes,
            shardings,
        )
        step = partial(
            optim.train_step, self.model, self.tx, self.learning_rate, z_loss=self.config.z_loss
        )
        self.step_fn = jax.jit(
            step,
            donate_argnums=(0, 1),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
        )
        self.eval_fn = jax.jit(partial(optim.eval_step, self.model), out_shardings=self.replicated)
        self.init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)

    def initial_state(self) -> dict:
        """Fresh params and optimiser state and the RNG: what a run without a checkpoint or
        ``init_from`` starts from."""
        with sharding.activation_sharding(self.mesh):
            params = sharding.init_sharded(self.model, self.mesh, _key(self.config.seed))
        return self._state_around(params)

    def _state_around(self, params: dict) -> dict:
        """``params`` with a fresh optimiser state (its init reads only their shapes) and the
        run's RNG."""
        with sharding.activation_sharding(self.mesh):
            return {
                "params": params,
                "opt_state": self.init_opt(params),
                "rng": jax.make_array_from_process_local_data(
                    self.replicated, np.asarray(jax.random.key_data(_key(self.config.seed + 1)))
                ),
            }

    def _from_pretrained(self) -> tuple[dict, int]:
        """The state and step to start from with ``init_from``: its whole state and step with
        ``init_optimizer``, else its params alone (so a params-only checkpoint, an imported
        Hugging Face model, also serves) at step 0."""
        source = self.config.init_from
        assert source is not None
        directory = checkpoints_dir(train_output_of(source))
        with ocp.CheckpointManager(directory) as other:
            step = other.latest_step()
            if step is None:
                raise FileNotFoundError(f"init_from {source}: no checkpoint in {directory}")
            if self.config.init_optimizer:
                state, start, _ = restore_checkpoint(other, step, self.abstract_state)
            else:
                params = restore_params(other, step, self.abstract_state["params"])
                state, start = self._state_around(params), 0
        log.info("initialised from %s step %d", directory, step)
        return state, start

    def _starting_state(self, manager: ocp.CheckpointManager) -> tuple[dict, int, Position]:
        """State, step and loader position to start from: the latest checkpoint of this run,
        else ``init_from``, else fresh. A restore needs only the state's shapes: making a fresh
        state first would double the state's memory while the checkpoint loads."""
        latest = manager.latest_step()
        if latest is not None:
            state, start, position = restore_checkpoint(manager, latest, self.abstract_state)
            log.info("resumed from step %d (loader %s)", start, position)
            return state, start, position
        if self.config.init_from:
            state, start = self._from_pretrained()
            return state, start, Position()
        return self.initial_state(), 0, Position()

    def _loader(self, position: Position) -> Loader:
        """The training rows from ``position`` on: this host's columns of each batch."""
        width = self.columns.stop - self.columns.start
        return Loader(
            self.train_data,
            self.config.global_batch,
            self.config.micro_batches,
            self.config.seed,
            host_index=self.columns.start // width,
            host_count=self.rows_shape[1] // width,
            start=position,
            mixture=self.mixture,
        )

    def train(self, sink: Sink | None = None, preemption_sync: bool = False) -> TrainResult:
        """Run (or continue) the loop to ``config.steps``; ``sink`` gets metric records.
        ``preemption_sync``: this process joined ``jax.distributed`` (see ``_Preemption``)."""
        config = self.config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, keep_period=config.keep_every, create=True
        )
        preemption = _Preemption(preemption_sync)
        directory = checkpoints_dir(self.output)
        with ocp.CheckpointManager(directory, options=options) as manager:
            try:
                return self._loop(manager, preemption, sink or (lambda _: None))
            finally:
                preemption.restore()

    def _loop(
        self, manager: ocp.CheckpointManager, preemption: _Preemption, sink: Sink
    ) -> TrainResult:
        state, start, position = self._starting_state(manager)
        loader = self._loader(position)
        progress = _Progress(step=start, meter=self._meter())
        try:
            with sharding.activation_sharding(self.mesh):
                while progress.step < self.config.steps:
                    if preemption.due(progress.step):
                        progress.preempted = True
                        break
                    state = self._step(manager, loader, state, progress, sink)
                if progress.preempted and manager.latest_step() != progress.step:
                    self._save(manager, progress.step, state, loader.position)
        finally:
            loader.close()
            manager.wait_until_finished()
        return TrainResult(
            step=progress.step,
            preempted=progress.preempted,
            resumed_from=start,
            train_loss=progress.train_loss,
            val_loss=progress.val_loss,
            params_sha256=_digest(state["params"]),
            losses=progress.losses,
        )

    def _step(
        self,
        manager: ocp.CheckpointManager,
        loader: Loader,
        state: dict,
        progress: _Progress,
        sink: Sink,
    ) -> dict:
        """One optimiser step, then its metric record, validation and checkpoint when due."""
        config, step = self.config, progress.step
        began = time.perf_counter()
        rows = jax.make_array_from_process_local_data(
            self.rows_sharding, next(loader), self.rows_shape
        )
        params, opt_state, metrics = self.step_fn(
            state["params"], state["opt_state"], jnp.int32(step), rows
        )
        state = {"params": params, "opt_state": opt_state, "rng": state["rng"]}
        values = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"training loss is {values['loss']} at step {step}; the last good "
                f"checkpoint is step {manager.latest_step()}"
            )
        record = {**values, **progress.done(values["loss"], time.perf_counter() - began)}
        step = progress.step
        if step % config.val_every == 0 or step == config.steps:
            progress.val_loss = record["val_loss"] = self.validate(params)
        if step % config.log_every == 0 or "val_loss" in record:
            sink(record)
        if step % config.checkpoint_every == 0 or step == config.steps:
            self._save(manager, step, state, loader.position)
        return state

    def _save(
        self, manager: ocp.CheckpointManager, step: int, state: dict, position: Position
    ) -> None:
        save_checkpoint(manager, step, state, position)
        log.info("checkpoint step %d", step)

    def validate(self, params: dict) -> float:
        """Mean cross-entropy over the fixed validation batches."""
        columns = self.columns
        total = 0.0
        for rows in self.val_rows:
            shape = rows.shape
            local = rows[columns]
            total += float(
                self.eval_fn(
                    params, jax.make_array_from_process_local_data(self.val_sharding, local, shape)
                )
            )
        return total / len(self.val_rows)

    def _meter(self) -> _Meter:
        peak, source = peak_flops(self.config.peak_flops_per_device)
        log.info("train: MFU against %.3g FLOP/s (%s)", peak, source)
        tokens = self.config.global_batch * self.seq_len
        return _Meter(tokens, flops_per_token(self.model, self.seq_len) * tokens, peak)


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed)


def main(argv: list[str] | None = None) -> None:
    config_json, tokenize_dir, output = argv or sys.argv[1:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    config = TrainConfig.model_validate_json(config_json)
    trainer = Trainer(config, tokenize_dir, output)

    def emit(record: dict[str, float]) -> None:
        print(json.dumps(record), flush=True)

    result = trainer.train(emit)
    print(json.dumps({"result": {**result.__dict__, "losses": None}}), flush=True)


if __name__ == "__main__":
    main()
