"""Our JAX parameters to and from a Hugging Face model directory (GPT-J or GPT-NeoX).

``export_hf`` writes what ``AutoModelForCausalLM.from_pretrained(dir)`` loads as it is:
``config.json`` (every field set), ``model-0000X-of-0000N.safetensors`` shards of at most
``max_shard_bytes`` (a larger single tensor gets a shard of its own) with
``model.safetensors.index.json``, ``generation_config.json`` and, if given, the tokenize
stage's tokenizer files. Tensors come from ``hf_mapping.iter_hf_tensors`` one at a time and
only the current shard is held, so memory is bounded by the shard size, not the model. The
export is built in a sibling temp directory and renamed into place at the end, so a
partial export never sits at ``dest``.

``import_hf`` reads such a directory back through ``hf_mapping.params_from_hf``, opening
each safetensors tensor lazily. Pickled ``.bin`` weights are refused unless the caller
says it trusts them (``torch.load`` can run arbitrary code).

``load_checkpoint_params`` restores the float32 parameters of a train stage output from its
Orbax checkpoint (the latest step or a chosen one), as numpy arrays on the host.

The ``convert`` stage exports the train stage's checkpoint with the tokenize stage's
tokenizer as one ledger unit, ``model``: the directory ``{out}/model/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np
from flax import linen as nn
from pydantic import Field
from safetensors import safe_open
from safetensors.numpy import save_file

from pipeline.stage import StageConfig, StageContext, register
from stages.train.hf_mapping import (
    Params,
    config_from_hf,
    hf_config,
    iter_hf_tensors,
    params_from_hf,
)
from stages.train.model import init_params
from stages.train.model_config import ModelConfig

log = logging.getLogger(__name__)

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file or tensor."""


def _expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(lambda r: nn.unbox(init_params(config, r)), jax.random.key(0))
    return {
        tuple(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    }


def check_params(config: ModelConfig, params: Params, where: str) -> None:
    """Raise ConvertError naming the first missing, extra or wrongly shaped leaf."""
    expected = _expected_shapes(config)
    found = {
        tuple(k.key for k in path): np.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    for path, shape in expected.items():
        name = "/".join(path)
        if path not in found:
            raise ConvertError(f"{where}: tensor {name} is missing")
        if found[path] != shape:
            raise ConvertError(f"{where}: tensor {name} has shape {found[path]}, expected {shape}")
    extra = sorted("/".join(p) for p in found.keys() - expected.keys())
    if extra:
        raise ConvertError(f"{where}: unexpected tensors {', '.join(extra)}")


def _cast(tensor: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # Through float32 first, so bf16 master weights and float32 ones round the same way.
    return np.ascontiguousarray(np.asarray(tensor, np.float32).astype(dtype))


def _shards(
    tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int
) -> Iterator[dict[str, np.ndarray]]:
    """Groups consecutive tensors into shards of at most ``max_shard_bytes``."""
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, tensor in tensors:
        if shard and size + tensor.nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    if shard:
        yield shard


def _write_weights(
    config: ModelConfig, params: Params, tmp: str, dtype: np.dtype, max_shard_bytes: int
) -> tuple[int, int]:
    """Shards and the index into ``tmp``; returns (shard count, total bytes)."""
    tensors = ((n, _cast(t, dtype)) for n, t in iter_hf_tensors(config, params))
    weight_map: dict[str, int] = {}
    total = 0
    count = 0
    for count, shard in enumerate(_shards(tensors, max_shard_bytes), start=1):
        save_file(shard, os.path.join(tmp, f"shard-{count}"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, count))
        total += sum(t.nbytes for t in shard.values())
    names = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, name in names.items():
        os.replace(os.path.join(tmp, f"shard-{i}"), os.path.join(tmp, name))
    index = {
        "metadata": {"total_size": total},
        "weight_map": {tensor: names[i] for tensor, i in sorted(weight_map.items())},
    }
    _write_json(os.path.join(tmp, INDEX), index)
    return count, total


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_configs(
    config: ModelConfig, tmp: str, dtype: str, bos_token_id: int | None, eos_token_id: int | None
) -> None:
    import transformers

    fields = hf_config(config)
    hf_conf = transformers.AutoConfig.for_model(
        fields.pop("model_type"),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype=dtype,
        **fields,
    )
    hf_conf.to_json_file(os.path.join(tmp, "config.json"), use_diff=False)
    generation = transformers.GenerationConfig(
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id
    )
    generation.save_pretrained(tmp)


def _copy_tokenizer(tokenizer_dir: str, tmp: str) -> None:
    present = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
    if "tokenizer.json" not in present:
        raise ConvertError(f"{tokenizer_dir}: no tokenizer.json to export with the model")
    for name in present:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))


def export_hf(
    params: Params,
    config: ModelConfig,
    dest: str,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> str:
    """Write ``params`` (an unboxed tree) as a Hugging Face model directory at ``dest``.

    ``dest`` must not exist yet. ``bos_token_id`` defaults to ``eos_token_id`` (GPT-2's
    ``<|endoftext|>`` is both). Returns ``dest``."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ConvertError(f"max_shard_bytes {max_shard_bytes} must be positive")
    dest = os.path.abspath(dest)
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; export writes a new directory")
    check_params(config, params, "params")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.partial-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        shards, total = _write_weights(config, params, tmp, DTYPES[dtype], max_shard_bytes)
        bos = eos_token_id if bos_token_id is None else bos_token_id
        _write_configs(config, tmp, dtype, bos, eos_token_id)
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s: %d shards, %.1f MB %s", dest, shards, total / 1e6, dtype)
    return dest


class _LazyTensors(Mapping[str, np.ndarray]):
    """Tensor name -> array, read from its safetensors file only when asked for."""

    def __init__(self, src: str, files: list[str]):
        self._src = src
        self._file_of: dict[str, str] = {}
        for name in files:
            path = os.path.join(src, name)
            try:
                with safe_open(path, framework="numpy") as f:
                    self._file_of.update(dict.fromkeys(f.keys(), path))
            except Exception as exc:
                raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._file_of:
            raise ConvertError(f"{self._src}: tensor {name} is missing")
        path = self._file_of[name]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise ConvertError(f"{path}: cannot read tensor {name} ({exc})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _weight_files(src: str, trust_pickle: bool) -> tuple[list[str], bool]:
    """The weight files of ``src`` and whether they are pickles."""
    index = os.path.join(src, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values())), False
    if os.path.exists(os.path.join(src, SINGLE)):
        return [SINGLE], False
    pickles = sorted(n for n in os.listdir(src) if n.endswith(".bin"))
    if not pickles:
        raise ConvertError(f"{src}: no {INDEX}, {SINGLE} or .bin weights")
    if not trust_pickle:
        raise ConvertError(
            f"{os.path.join(src, pickles[0])}: pickled weights can run code when loaded; "
            "convert them to safetensors or pass trust_pickle=True if you trust the file"
        )
    return pickles, True


def _pickled_tensors(src: str, files: list[str]) -> dict[str, np.ndarray]:
    import torch

    state: dict[str, np.ndarray] = {}
    for name in files:
        # weights_only even when trusted: a state dict needs nothing more, and it is safer.
        loaded = torch.load(os.path.join(src, name), map_location="cpu", weights_only=True)
        # numpy has no bfloat16 for torch to hand over, so pickled weights come as float32.
        state.update({k: v.float().numpy() for k, v in loaded.items()})
    return state


def import_hf(src: str, trust_pickle: bool = False) -> tuple[Params, ModelConfig]:
    """Our parameter tree and config from a Hugging Face directory: numpy in the safetensors'
    dtype (float32 from trusted ``.bin`` pickles)."""
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path) as f:
            config = config_from_hf(json.load(f))
    except (OSError, ValueError, KeyError) as exc:
        raise ConvertError(f"{config_path}: {exc}") from None
    files, pickled = _weight_files(src, trust_pickle)
    state = _pickled_tensors(src, files) if pickled else _LazyTensors(src, files)
    params = params_from_hf(config, state)
    check_params(config, params, src)
    return params, config


def load_checkpoint_params(train_output: str, step: int | None = None) -> Params:
    """The parameters saved by the train stage at ``step`` (the latest if None), as numpy."""
    import orbax.checkpoint as ocp

    from stages.train.trainer import CHECKPOINTS

    directory = os.path.join(train_output, CHECKPOINTS)
    handlers = {"state": ocp.PyTreeCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        chosen = manager.latest_step() if step is None else step
        if chosen is None or chosen not in manager.all_steps():
            raise ConvertError(
                f"{directory}: no checkpoint at step {chosen}; have {manager.all_steps()}"
            )
        # Only the params subtree is read: the optimiser state would triple peak memory.
        params = {"params": manager.item_metadata(chosen)["state"].tree["params"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
        restored = manager.restore(
            chosen,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=params, restore_args=restore_args, partial_restore=True
                )
            ),
        )
    return restored["state"]["params"]


def read_model_config(train_output: str) -> ModelConfig:
    """The ``ModelConfig`` the train stage wrote beside its checkpoints."""
    from stages.train.stage import MODEL_CONFIG

    with open(os.path.join(train_output, MODEL_CONFIG)) as f:
        return ModelConfig.model_validate_json(f.read())


class ConvertConfig(StageConfig):
    """Export of the trained model as a Hugging Face directory."""

    step: int | None = None
    """Checkpoint step to export; None takes the latest."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the exported weights (cast from float32)."""
    max_shard_bytes: int = Field(default=DEFAULT_MAX_SHARD_BYTES, gt=0)
    """Largest safetensors shard; a larger single tensor gets a shard of its own."""


MODEL_UNIT = "model"


@register("convert", ConvertConfig, inputs=("train", "tokenize"))
def run(ctx: StageContext) -> None:
    """Export the checkpoint to ``{out}/model/`` (skipped when already committed)."""
    from stages.tokenize import read_manifest

    config: ConvertConfig = ctx.config
    if ctx.ledger.is_committed(MODEL_UNIT):
        log.info("convert: %s/%s already exported", ctx.output, MODEL_UNIT)
        return
    train, tokenize = ctx.inputs["train"].uri, ctx.inputs["tokenize"].uri
    model = read_model_config(train)
    params = load_checkpoint_params(train, config.step)
    eos = int(read_manifest(tokenize)["eos_id"])
    with tempfile.TemporaryDirectory() as tmp:
        local = export_hf(
            params,
            model,
            os.path.join(tmp, MODEL_UNIT),
            dtype=config.dtype,
            max_shard_bytes=config.max_shard_bytes,
            tokenizer_dir=os.path.join(tokenize, "tokenizer"),
            eos_token_id=eos,
        )
        total = 0
        with ctx.ledger.unit(MODEL_UNIT) as unit:
            for name in sorted(os.listdir(local)):
                with (
                    open(os.path.join(local, name), "rb") as src,
                    unit.open(f"{MODEL_UNIT}/{name}") as dst,
                ):
                    shutil.copyfileobj(src, dst)
                total += os.path.getsize(os.path.join(local, name))
            unit.metadata.update(dtype=config.dtype, bytes=total)
    ctx.record(export_bytes=total)
