"""The training loop one host runs: mesh, sharded state, loader, checkpoints, metrics.

Every host (JAX process) runs ``train`` with its own ``process_index``; together they form
one global mesh. State (params, optimiser state, RNG) is saved with Orbax every
``checkpoint_every`` steps together with the step and the loader position, and a run finds
the latest checkpoint in ``{output}/checkpoints`` and continues from it: the batches, the
updates and therefore the final parameters are the same as an uninterrupted run's (bitwise
on CPU). SIGTERM (a preemption notice) to any host finishes the current step, and then all
hosts save at one step they agree on and return.

``python -m stages.train.trainer CONFIG_JSON TOKENIZE_DIR OUTPUT_DIR`` runs one
single-process host and prints one JSON line of metrics per step (the tests kill it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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
from stages.train.config import TrainConfig
from stages.train.loader import Loader, Position, load_split, validation_batches
from stages.train.model_config import ModelConfig, param_count, preset

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CHECKPOINT_CHUNK_BYTES = 16 * 1024**2
Sink = Callable[[dict[str, float]], None]


def chunked_save(state: dict) -> ocp.args.StandardSave:
    """Orbax's save of ``state`` in zarr chunks of at most ``CHECKPOINT_CHUNK_BYTES``.

    Orbax's default is one chunk per leaf, one zstd frame that one thread decompresses;
    chunks are restored in parallel (restoring a one-chunk checkpoint took 2.4x the CPU time).
    """
    chunk = ocp.SaveArgs(chunk_byte_size=CHECKPOINT_CHUNK_BYTES)
    return ocp.args.StandardSave(state, save_args=jax.tree.map(lambda _: chunk, state))


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


def model_config(config: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset with overrides, the run's compute dtype and float32 master params."""
    model = preset(
        config.model, **{**config.model_overrides, "dtype": config.dtype, "param_dtype": "float32"}
    )
    if model.vocab_size < vocab_size:
        raise ValueError(
            f"model {config.model} has {model.vocab_size} embeddings, the tokenizer "
            f"{vocab_size} ids"
        )
    return model


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward and backward plus
    12 * layers * d_model * seq_len for attention scores and values (PaLM, appendix B);
    rematerialisation is not counted, so this is model (not hardware) FLOPs."""
    return 6 * param_count(model) + 12 * model.n_layers * model.d_model * seq_len


def measured_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``size``² matmul on this process's first device (the CPU peak
    we hold MFU to when no peak is configured)."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(x).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _process_columns(batch_sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The batch columns this process's devices hold; the loader must hand it those."""
    columns = {
        (index[1].start or 0, shape[1] if index[1].stop is None else index[1].stop)
        for index in batch_sharding.addressable_devices_indices_map(shape).values()
    }
    start, stop = min(c[0] for c in columns), max(c[1] for c in columns)
    return slice(start, stop)


def _digest(params: dict) -> str:
    sha = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        value = multihost_utils.process_allgather(leaf, tiled=True)
        sha.update(jax.tree_util.keystr(path).encode())
        sha.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    return sha.hexdigest()


class _Preemption:
    """Decides before each step whether to save and stop for a preemption notice (SIGTERM).

    One process: its own SIGTERM handler. Several (``jax.distributed``): JAX's preemption
    sync service, whose SIGTERM handler ``jax.distributed.initialize`` installed (so none is
    installed here, which would replace it): the host that gets the signal tells the
    coordinator, and ``reached_preemption_sync_point`` turns true on every host at the same
    step, one past the furthest any host had reached. All hosts then save the same checkpoint
    and stop together; none is left waiting in a collective for a host that has gone.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous = None
        self._shared = jax.process_count() > 1
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
        if config.compilation_cache:
            jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
        manifest = read_manifest(tokenize_dir)
        self.seq_len = int(manifest["seq_len"])
        self.model = model_config(config, int(manifest["tokenizer"]["vocab_size"]))
        self.mesh = sharding.make_mesh(*config.mesh.resolve(jax.device_count()))
        self.tx = optim.optimizer(config.optimizer, config.micro_batches)
        self.learning_rate = optim.schedule(config.optimizer)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.param_shardings = sharding.param_shardings(self.model, self.mesh)
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
        params = jax.eval_shape(partial(sharding.init_sharded, self.model, self.mesh), _key(0))
        opt_state = jax.eval_shape(self.tx.init, params)
        self.opt_shardings = optax.tree_map_params(
            self.tx,
            lambda _, s: s,
            opt_state,
            self.param_shardings,
            transform_non_params=lambda _: self.replicated,
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
        """Fresh params and optimiser state (or those of ``init_from``) and the RNG."""
        with sharding.activation_sharding(self.mesh):
            params = sharding.init_sharded(self.model, self.mesh, _key(self.config.seed))
            state = {
                "params": params,
                "opt_state": self.init_opt(params),
                "rng": jax.make_array_from_process_local_data(
                    self.replicated, np.asarray(jax.random.key_data(_key(self.config.seed + 1)))
                ),
            }
        return state

    def _abstract(self, state: dict) -> dict:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def _pretrained_args(self, state: dict) -> ocp.args.Composite:
        """The whole state and step of ``init_from`` with ``init_optimizer``, else its params
        alone, so a params-only checkpoint (an imported Hugging Face model) also serves."""
        if self.config.init_optimizer:
            return ocp.args.Composite(
                state=ocp.args.StandardRestore(self._abstract(state)), meta=ocp.args.JsonRestore()
            )
        params = {"params": self._abstract(state)["params"]}
        restore_args = ocp.checkpoint_utils.construct_restore_args(params)
        return ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=params, restore_args=restore_args, partial_restore=True
            )
        )

    def _from_pretrained(self, state: dict) -> tuple[dict, int]:
        source = self.config.init_from
        assert source is not None
        directory = source if source.rstrip("/").endswith(CHECKPOINTS) else _join(source)
        with ocp.CheckpointManager(directory) as other:
            step = other.latest_step()
            if step is None:
                raise FileNotFoundError(f"init_from {source}: no checkpoint in {directory}")
            restored = other.restore(step, args=self._pretrained_args(state))
        log.info("initialised from %s step %d", directory, step)
        if self.config.init_optimizer:
            return restored["state"], int(restored["meta"]["step"])
        return {**state, "params": restored["state"]["params"]}, 0

    def train(self, sink: Sink | None = None) -> TrainResult:
        """Run (or continue) the loop to ``config.steps``; ``sink`` gets metric records."""
        config = self.config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, keep_period=config.keep_every, create=True
        )
        preemption = _Preemption()
        with ocp.CheckpointManager(_join(self.output), options=options) as manager:
            try:
                return self._loop(manager, preemption, sink or (lambda _: None))
            finally:
                preemption.restore()

    def _loop(
        self, manager: ocp.CheckpointManager, preemption: _Preemption, sink: Sink
    ) -> TrainResult:
        config = self.config
        state = self.initial_state()
        start, position = 0, Position()
        latest = manager.latest_step()
        if latest is not None:
            restored = manager.restore(
                latest,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(self._abstract(state)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            state, meta = restored["state"], restored["meta"]
            start, position = int(meta["step"]), Position(**meta["loader"])
            log.info("resumed from step %d (loader %s)", start, position)
        elif config.init_from:
            state, start = self._from_pretrained(state)
        loader = Loader(
            self.train_data,
            config.global_batch,
            config.micro_batches,
            config.seed,
            host_index=self.columns.start // (self.columns.stop - self.columns.start),
            host_count=self.rows_shape[1] // (self.columns.stop - self.columns.start),
            start=position,
            mixture=self.mixture,
        )
        peak = self._peak_flops()
        tokens_per_step = config.global_batch * self.seq_len
        flops_token = flops_per_token(self.model, self.seq_len)
        params, opt_state = state["params"], state["opt_state"]
        losses: dict[int, float] = {}
        val_loss, train_loss = math.nan, math.nan
        step, preempted = start, False
        try:
            with sharding.activation_sharding(self.mesh):
                while step < config.steps and not (preempted := preemption.due(step)):
                    began = time.perf_counter()
                    rows = jax.make_array_from_process_local_data(
                        self.rows_sharding, next(loader), self.rows_shape
                    )
                    params, opt_state, metrics = self.step_fn(
                        params, opt_state, jnp.int32(step), rows
                    )
                    values = {k: float(v) for k, v in metrics.items()}
                    train_loss = values["loss"]
                    if not math.isfinite(train_loss):
                        raise FloatingPointError(
                            f"training loss is {train_loss} at step {step}; the last good "
                            f"checkpoint is step {manager.latest_step()}"
                        )
                    seconds = time.perf_counter() - began
                    losses[step] = train_loss
                    step += 1
                    record = {
                        **values,
                        "step": step,
                        "step_time": seconds,
                        "tokens_per_s": tokens_per_step / seconds,
                        "mfu": flops_token * tokens_per_step / seconds / peak,
                    }
                    if step % config.val_every == 0 or step == config.steps:
                        val_loss = self.validate(params)
                        record["val_loss"] = val_loss
                    if step % config.log_every == 0 or "val_loss" in record:
                        sink(record)
                    if step % config.checkpoint_every == 0 or step == config.steps:
                        self._save(manager, step, params, opt_state, state["rng"], loader.position)
                if preempted and manager.latest_step() != step:
                    self._save(manager, step, params, opt_state, state["rng"], loader.position)
        finally:
            loader.close()
            manager.wait_until_finished()
        return TrainResult(
            step=step,
            preempted=preempted,
            resumed_from=start,
            train_loss=train_loss,
            val_loss=val_loss,
            params_sha256=_digest(params),
            losses=losses,
        )

    def _save(
        self,
        manager: ocp.CheckpointManager,
        step: int,
        params: dict,
        opt_state: optax.OptState,
        rng: jax.Array,
        position: Position,
    ) -> None:
        state = {"params": params, "opt_state": opt_state, "rng": rng}
        meta = {"step": step, "loader": position.to_dict()}
        manager.save(
            step,
            args=ocp.args.Composite(state=chunked_save(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
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

    def _peak_flops(self) -> float:
        if self.config.peak_flops_per_device:
            return self.config.peak_flops_per_device * jax.device_count()
        return measured_peak_flops() * jax.process_count()


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed)


def _join(output: str) -> str:
    return os.path.join(output, CHECKPOINTS) if "://" not in output else f"{output}/{CHECKPOINTS}"


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
