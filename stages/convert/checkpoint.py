"""The train stage's Orbax checkpoints: read one parameter at a time for export, written from
Hugging Face weights for fine-tuning.

A train output is ``{out}/model_config.json`` and ``{out}/checkpoints/<step>/`` with the
items ``state`` (params, optimiser state, RNG) and ``meta`` (step, loader position).
``CheckpointReader`` restores one leaf of ``state/params`` per call with Orbax's partial
restore, so ``export_checkpoint`` holds the leaves of the weight being written and of the
next one (read ahead; a leaf holds all layers of one weight) and two bands of rows of the
tensor being written, never the whole model and never the optimiser state.

``import_checkpoint`` turns a Hugging Face directory into the same layout with the float32
params alone (no optimiser state, no RNG) at step 0: ``train.init_from`` fine-tunes from it
with a fresh optimiser, and ``export_checkpoint`` exports it again bit for bit. Its params are
saved in the train stage's zarr chunks (``trainer.chunked_save``), which Orbax restores in
parallel.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pipeline import storage
from stages.convert.hf_dir import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportSummary,
    Opener,
    Tensors,
    import_hf,
    new_directory,
    write_hf,
)
from stages.convert.layout import ConvertError, LeafPath, Shape, check_shapes
from stages.train.hf_mapping import Params, TensorRule, tensor_rules
from stages.train.loader import Position
from stages.train.model_config import ModelConfig
from stages.train.stage import MODEL_CONFIG
from stages.train.trainer import CHECKPOINTS, chunked_save

log = logging.getLogger(__name__)


def read_model_config(train_output: str) -> ModelConfig:
    """The ``ModelConfig`` the train stage wrote beside its checkpoints."""
    path = storage.join(train_output, MODEL_CONFIG)
    try:
        return ModelConfig.model_validate_json(storage.read_text(path))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing; is {train_output} a train stage output?") from None


def _nested(path: LeafPath, value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def _get(tree: Any, path: LeafPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


class CheckpointReader:
    """The params of one checkpoint step of a train output, restored a leaf at a time."""

    def __init__(self, train_output: str, step: int | None = None):
        directory = storage.join(train_output, CHECKPOINTS)
        if not storage.is_gcs(directory) and not os.path.isdir(directory):
            raise ConvertError(f"{directory}: no checkpoints; is {train_output} a train output?")
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(directory, item_handlers=handlers)
        steps = self._manager.all_steps()
        chosen = self._manager.latest_step() if step is None else step
        if chosen is None or chosen not in steps:
            self._manager.close()
            raise ConvertError(f"{directory}: no checkpoint at step {chosen}; have {steps}")
        self.step: int = chosen
        self.where = f"{directory}/{chosen}"
        params = self._manager.item_metadata(chosen)["state"].tree["params"]
        self._metadata = {
            tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        }

    def shapes(self) -> dict[LeafPath, Shape]:
        """Every params leaf of the checkpoint and its shape, from the metadata alone."""
        return {path: tuple(leaf.shape) for path, leaf in self._metadata.items()}

    def read(self, path: LeafPath) -> np.ndarray:
        """One params leaf as a host numpy array; nothing else is read."""
        if path not in self._metadata:
            raise ConvertError(f"{self.where}: tensor {'/'.join(path)} is missing")
        item = {"params": _nested(path, self._metadata[path])}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = self._manager.restore(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                )
            ),
        )
        return _get(restored["state"]["params"], path)

    def read_all(self) -> Params:
        """Every params leaf (the whole model in memory; export does not need this)."""
        params: Params = {}
        for path in self._metadata:
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = self.read(path)
        return params

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint_params(train_output: str, step: int | None = None) -> Params:
    """The parameters saved by the train stage at ``step`` (the latest if None), as numpy."""
    with CheckpointReader(train_output, step) as reader:
        return reader.read_all()


def _read_leaves(reader: CheckpointReader, rule: TensorRule) -> list[np.ndarray]:
    return [reader.read(path) for path in rule.ours]


def iter_checkpoint_tensors(config: ModelConfig, reader: CheckpointReader) -> Tensors:
    """The Hugging Face tensors of a checkpoint in export order (``hf_mapping``'s rules).

    The leaves of the next rule are restored in a background thread while the current
    rule's tensors are written (Orbax decodes in native threads, the writer casts and
    writes), so at most two rules' leaves are held: the current ones and the next."""
    rules = tensor_rules(config)
    with ThreadPoolExecutor(1, thread_name_prefix="convert-read") as pool:
        pending = pool.submit(_read_leaves, reader, rules[0])
        for k, rule in enumerate(rules):
            leaves = pending.result()
            if k + 1 < len(rules):
                pending = pool.submit(_read_leaves, reader, rules[k + 1])
            if rule.per_layer:
                for i in range(config.n_layers):
                    yield rule.hf_name.format(i=i), rule.to_hf(*(leaf[i] for leaf in leaves))
            else:
                yield rule.hf_name, rule.to_hf(*leaves)
            # Released before the next rule's leaves are taken, and before the one after
            # them is read.
            del leaves


def export_checkpoint(
    reader: CheckpointReader,
    config: ModelConfig,
    opener: Opener,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | None = None,
    eos_token_id: int | None = None,
) -> ExportSummary:
    """Stream the checkpoint's params into a Hugging Face directory through ``opener``."""
    check_shapes(config, reader.shapes(), reader.where)
    return write_hf(
        config,
        iter_checkpoint_tensors(config, reader),
        opener,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        tokenizer_dir=tokenizer_dir,
        eos_token_id=eos_token_id,
    )


def export_train_output(
    train_output: str,
    dest: str,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenize_output: str | None = None,
) -> ExportSummary:
    """A train output's checkpoint (latest or ``step``) as the new directory ``dest`` (local
    or ``gs://``), with the tokenizer and EOS id of ``tokenize_output`` if given."""
    config = read_model_config(train_output)
    tokenizer_dir, eos = None, None
    if tokenize_output is not None:
        from stages.tokenize import read_manifest

        tokenizer_dir = storage.join(tokenize_output, "tokenizer")
        eos = int(read_manifest(tokenize_output)["eos_id"])
    with CheckpointReader(train_output, step) as reader, new_directory(dest) as opener:
        summary = export_checkpoint(
            reader, config, opener, dtype, max_shard_bytes, tokenizer_dir, eos
        )
    log.info(
        "convert export: %s step %d -> %s: %s", train_output, reader.step, dest, summary.line()
    )
    return summary


def write_checkpoint(params: Params, config: ModelConfig, dest: str, step: int = 0) -> None:
    """``params`` (numpy) as a params-only train output at the new local directory ``dest``,
    built in a hidden sibling and renamed into place."""
    if storage.is_gcs(dest):
        raise ConvertError(f"{dest}: import writes a local checkpoint directory")
    dest = os.path.abspath(storage.local_path(dest))
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; import writes a new directory")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.partial-{uuid.uuid4().hex}")
    try:
        options = ocp.CheckpointManagerOptions(create=True)
        with ocp.CheckpointManager(os.path.join(tmp, CHECKPOINTS), options=options) as manager:
            meta = {"step": step, "loader": Position().to_dict()}
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=chunked_save({"params": params}), meta=ocp.args.JsonSave(meta)
                ),
            )
            manager.wait_until_finished()
        with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
            f.write(config.model_dump_json(indent=1))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_checkpoint(src: str, dest: str, trust_pickle: bool = False) -> ModelConfig:
    """A Hugging Face directory (local or ``gs://``) as a params-only train output at
    ``dest`` that ``train.init_from`` fine-tunes from; returns its model config."""
    began = time.perf_counter()
    params, config = import_hf(src, trust_pickle)
    # float32 master weights, as the train stage keeps them; exact for bf16/fp16 sources.
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    config = config.model_copy(update={"param_dtype": "float32"})
    write_checkpoint(params, config, dest)
    leaves = jax.tree.leaves(params)
    nbytes = sum(leaf.nbytes for leaf in leaves)
    seconds = time.perf_counter() - began
    log.info(
        "convert import: %s -> %s: %d leaves, %.1f MB in %.1fs (%.0f MB/s)",
        src,
        dest,
        len(leaves),
        nbytes / 1e6,
        seconds,
        nbytes / 1e6 / max(seconds, 1e-9),
    )
    return config
