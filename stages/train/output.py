"""The train stage's output format: the one module that names its files and reads them.

A train output (``{out}``) holds:

- ``model_config.json``: the ``ModelConfig`` (pydantic's JSON, indent 1) that convert and
  evaluate rebuild the model from;
- ``checkpoints/{step}/``: Orbax checkpoints with the items ``state`` (params, optimiser state
  and RNG, in zarr chunks of at most ``CHECKPOINT_CHUNK_BYTES``) and ``meta`` (step and loader
  position); the latest is the trained model;
- ``summary.json``: steps, final train and val loss and the float32 params' sha256.

The two JSON files go through the stage's ledger, so the stage digest changes when the
trained parameters do; the checkpoints are Orbax's own atomic directories.

The trainer saves and restores with ``save_checkpoint``, ``restore_checkpoint`` and
``restore_params`` (sharded, on the mesh). Everything else reads through ``CheckpointReader``
(one params leaf at a time, as numpy), ``load_params`` (the model config and the whole
params, their shapes checked against each other first) or ``checkpoint_step``.
``write_checkpoint`` makes a params-only output at step 0 (an imported Hugging Face model)
that ``init_from`` starts from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pipeline import storage
from pipeline.ledger import Ledger
from stages.train.loader import Position
from stages.train.model_config import ModelConfig
from stages.train.params import (
    LeafPath,
    ModelFormatError,
    Params,
    Shape,
    check_shapes,
    leaf_at,
    leaf_paths,
    set_leaf,
)

MODEL_CONFIG = "model_config.json"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
SUMMARY_FIELDS = ("step", "train_loss", "val_loss", "params_sha256")
CHECKPOINT_CHUNK_BYTES = 16 * 1024**2


def model_config_json(config: ModelConfig) -> str:
    """The text of ``model_config.json``: what the model is, for convert and evaluate."""
    # ``attention`` is how the model is run (each reader picks its own kernel), not what it
    # is: left out, the file and the train stage's digest stay as they were before it.
    return config.model_dump_json(indent=1, exclude={"attention"})


def commit_model_config(ledger: Ledger, config: ModelConfig) -> None:
    """Commit ``model_config.json`` (its own ledger unit) unless it is committed already."""
    if not ledger.is_committed(MODEL_CONFIG):
        ledger.commit_file(MODEL_CONFIG, MODEL_CONFIG, model_config_json(config).encode())


def commit_summary(ledger: Ledger, result: Mapping[str, Any]) -> None:
    """Commit ``summary.json`` (its own ledger unit) from the hosts' result."""
    ledger.commit_json(SUMMARY, SUMMARY, {key: result[key] for key in SUMMARY_FIELDS})


def is_train_output(path: str) -> bool:
    """Whether ``path`` holds a train output (its model config)."""
    return storage.exists(storage.join(path, MODEL_CONFIG))


def read_model_config(train_output: str) -> ModelConfig:
    """The ``ModelConfig`` the train stage wrote beside its checkpoints."""
    path = storage.join(train_output, MODEL_CONFIG)
    try:
        return ModelConfig.model_validate_json(storage.read_text(path))
    except FileNotFoundError:
        raise ModelFormatError(
            f"{path}: missing; is {train_output} a train stage output?"
        ) from None


def train_output_of(location: str) -> str:
    """The train output ``location`` names: the output itself or its ``checkpoints/``
    directory (``init_from`` takes either)."""
    return location.rstrip("/").removesuffix("/" + CHECKPOINTS)


def checkpoints_dir(train_output: str) -> str:
    """Where a train output's Orbax checkpoints are."""
    return storage.join(train_output, CHECKPOINTS)


def chunked_save(state: dict) -> ocp.args.StandardSave:
    """Orbax's save of ``state`` in zarr chunks of at most ``CHECKPOINT_CHUNK_BYTES``.

    Orbax's default is one chunk per leaf, one zstd frame that one thread decompresses;
    chunks are restored in parallel (restoring a one-chunk checkpoint took 2.4x the CPU time).
    """
    chunk = ocp.SaveArgs(chunk_byte_size=CHECKPOINT_CHUNK_BYTES)
    return ocp.args.StandardSave(state, save_args=jax.tree.map(lambda _: chunk, state))


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state: dict, position: Position
) -> None:
    """Save ``state`` (params, and optimiser state and RNG where a run has them) as
    checkpoint ``step``, with the step and the loader position."""
    meta = {"step": step, "loader": position.to_dict()}
    manager.save(
        step,
        args=ocp.args.Composite(state=chunked_save(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def restore_checkpoint(
    manager: ocp.CheckpointManager, step: int, abstract: dict
) -> tuple[dict, int, Position]:
    """The whole state of checkpoint ``step`` laid out as ``abstract`` (shapes, dtypes and
    shardings), its step and its loader position."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    meta = restored["meta"]
    return restored["state"], int(meta["step"]), Position(**meta["loader"])


def _params_restore(item: dict, restore_args: Any) -> ocp.args.Composite:
    return ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )


def restore_params(manager: ocp.CheckpointManager, step: int, abstract: Params) -> Params:
    """The params alone of checkpoint ``step``, laid out as ``abstract``; a params-only
    checkpoint (an imported Hugging Face model) serves as well as a whole one."""
    item = {"params": abstract}
    args = _params_restore(item, ocp.checkpoint_utils.construct_restore_args(item))
    return manager.restore(step, args=args)["state"]["params"]


class CheckpointReader:
    """The params of one checkpoint step of a train output, restored a leaf at a time."""

    def __init__(self, train_output: str, step: int | None = None):
        directory = checkpoints_dir(train_output)
        if not storage.is_gcs(directory) and not os.path.isdir(directory):
            raise ModelFormatError(
                f"{directory}: no checkpoints; is {train_output} a train output?"
            )
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(directory, item_handlers=handlers)
        steps = self._manager.all_steps()
        chosen = self._manager.latest_step() if step is None else step
        if chosen is None or chosen not in steps:
            self._manager.close()
            raise ModelFormatError(f"{directory}: no checkpoint at step {chosen}; have {steps}")
        self.step: int = chosen
        self.where = f"{directory}/{chosen}"
        self._metadata = leaf_paths(self._manager.item_metadata(chosen)["state"].tree["params"])

    def shapes(self) -> dict[LeafPath, Shape]:
        """Every params leaf of the checkpoint and its shape, from the metadata alone."""
        return {path: tuple(leaf.shape) for path, leaf in self._metadata.items()}

    def read(self, path: LeafPath) -> np.ndarray:
        """One params leaf as a host numpy array; nothing else is read."""
        if path not in self._metadata:
            raise ModelFormatError(f"{self.where}: tensor {'/'.join(path)} is missing")
        item: Params = {}
        set_leaf(item, ("params", *path), self._metadata[path])
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = self._manager.restore(self.step, args=_params_restore(item, restore_args))
        return leaf_at(restored["state"]["params"], path)

    def read_all(self) -> Params:
        """Every params leaf (the whole model in memory; export does not need this)."""
        params: Params = {}
        for path in self._metadata:
            set_leaf(params, path, self.read(path))
        return params

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_step(train_output: str, step: int | None = None) -> int:
    """The checkpoint step ``load_params`` reads: ``step`` if it was saved, else the latest."""
    with CheckpointReader(train_output, step) as reader:
        return reader.step


def load_checkpoint_params(train_output: str, step: int | None = None) -> Params:
    """The params saved at ``step`` (the latest if None) as numpy, as they are (no model
    config is read, so a bare trainer output serves too)."""
    with CheckpointReader(train_output, step) as reader:
        return reader.read_all()


def load_params(
    train_output: str, step: int | None = None, label: str | None = None
) -> tuple[ModelConfig, Params]:
    """The model config and the params of checkpoint ``step`` (the latest if None) as numpy,
    their shapes checked against each other before any tensor is read. ``ModelFormatError``
    names the first tensor the config does not expect, in ``label`` (default: the checkpoint
    directory)."""
    config = read_model_config(train_output)
    with CheckpointReader(train_output, step) as reader:
        check_shapes(config, reader.shapes(), label or f"checkpoint {reader.where}")
        return config, reader.read_all()


def write_checkpoint(params: Params, config: ModelConfig, dest: str, step: int = 0) -> None:
    """``params`` (numpy) as a params-only train output at the new local directory ``dest``,
    built in a hidden sibling and renamed into place."""
    if storage.is_gcs(dest):
        raise ModelFormatError(f"{dest}: import writes a local checkpoint directory")
    with storage.new_local_directory(dest, "import") as tmp:
        options = ocp.CheckpointManagerOptions(create=True)
        with ocp.CheckpointManager(checkpoints_dir(tmp), options=options) as manager:
            save_checkpoint(manager, step, {"params": params}, Position())
            manager.wait_until_finished()
        with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
            f.write(model_config_json(config))
