"""The train stage's checkpoints to and from Hugging Face directories: export streams one
parameter at a time, import writes a params-only train output for fine-tuning.

The train output is read and written through ``stages.train.output``: its
``CheckpointReader`` restores one leaf of the params per call, so ``export_checkpoint`` holds
the leaves of the weight being written and of the next one (read ahead; a leaf holds all
layers of one weight) and two bands of rows of the tensor being written, never the whole
model and never the optimiser state.

``import_checkpoint`` turns a Hugging Face directory into a train output with the float32
params alone (no optimiser state, no RNG) at step 0 (``write_checkpoint``):
``train.init_from`` fine-tunes from it with a fresh optimiser, and ``export_checkpoint``
exports it again bit for bit.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Unpack

import jax
import numpy as np

from pipeline import storage
from stages.convert.hf_dir import (
    DEFAULT_MAX_SHARD_BYTES,
    ExportSummary,
    HfOptions,
    Opener,
    Tensors,
    import_hf,
    new_directory,
    write_hf,
)
from stages.tokenize import read_manifest
from stages.train.hf_mapping import TensorRule, tensor_rules
from stages.train.model_config import ModelConfig
from stages.train.output import CheckpointReader, read_model_config, write_checkpoint
from stages.train.params import check_shapes

log = logging.getLogger(__name__)


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
    reader: CheckpointReader, config: ModelConfig, opener: Opener, **options: Unpack[HfOptions]
) -> ExportSummary:
    """Stream the checkpoint's params into a Hugging Face directory through ``opener``, with
    ``write_hf``'s ``options``."""
    check_shapes(config, reader.shapes(), reader.where)
    return write_hf(config, iter_checkpoint_tensors(config, reader), opener, **options)


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
        tokenizer_dir = storage.join(tokenize_output, "tokenizer")
        eos = int(read_manifest(tokenize_output)["eos_id"])
    with CheckpointReader(train_output, step) as reader, new_directory(dest) as opener:
        summary = export_checkpoint(
            reader,
            config,
            opener,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            tokenizer_dir=tokenizer_dir,
            eos_token_id=eos,
        )
    log.info(
        "convert export: %s step %d -> %s: %s", train_output, reader.step, dest, summary.line()
    )
    return summary


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
