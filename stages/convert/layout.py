"""What a converted model is made of, known before any weight is read: our leaves and their
shapes, the Hugging Face tensors in export order with their shapes, the export dtypes, and
the error every bad input raises.

Knowing every Hugging Face tensor's name and shape up front is what lets the exporter write
each safetensors header before the tensors' bytes, and so stream them straight to disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import jax
import ml_dtypes
import numpy as np
from flax import linen as nn

from stages.train.hf_mapping import Params, tensor_rules
from stages.train.model import init_params
from stages.train.model_config import ModelConfig

LeafPath = tuple[str, ...]
Shape = tuple[int, ...]

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file or tensor."""


def check_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an export dtype name."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@cache
def expected_shapes(config: ModelConfig) -> dict[LeafPath, Shape]:
    """Every leaf of our parameter tree and its shape (layer-stacked leaves included); one
    trace of the model per config (callers must not change the dict)."""
    abstract = jax.eval_shape(lambda r: nn.unbox(init_params(config, r)), jax.random.key(0))
    return {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    }


def leaf_shapes(params: Params) -> dict[LeafPath, Shape]:
    """The leaves of a parameter tree and their shapes."""
    return {
        tuple(k.key for k in path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def check_shapes(config: ModelConfig, found: Mapping[LeafPath, Shape], where: str) -> None:
    """Raise ConvertError naming the first missing, extra or wrongly shaped leaf."""
    expected = expected_shapes(config)
    for path, shape in expected.items():
        name = "/".join(path)
        if path not in found:
            raise ConvertError(f"{where}: tensor {name} is missing")
        if tuple(found[path]) != shape:
            raise ConvertError(f"{where}: tensor {name} has shape {found[path]}, expected {shape}")
    extra = sorted("/".join(p) for p in found.keys() - expected.keys())
    if extra:
        raise ConvertError(f"{where}: unexpected tensors {', '.join(extra)}")


def check_params(config: ModelConfig, params: Params, where: str) -> None:
    """``check_shapes`` for a parameter tree."""
    check_shapes(config, leaf_shapes(params), where)


def hf_tensor_shapes(config: ModelConfig) -> list[tuple[str, Shape]]:
    """The Hugging Face tensors in the order the exporter writes them, with their shapes."""
    ours = expected_shapes(config)
    planned: list[tuple[str, Shape]] = []
    for rule in tensor_rules(config):
        # Zero-stride stand-ins: the mapping's reshapes and transposes cost no memory.
        cut = 1 if rule.per_layer else 0
        dummies = [np.broadcast_to(np.float32(0), ours[path][cut:]) for path in rule.ours]
        shape = tuple(rule.to_hf(*dummies).shape)
        names = (
            [rule.hf_name.format(i=i) for i in range(config.n_layers)]
            if rule.per_layer
            else [rule.hf_name]
        )
        planned.extend((name, shape) for name in names)
    return planned
