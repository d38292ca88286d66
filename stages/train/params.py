"""The model's parameter tree as data: leaf paths, the shapes a model config implies, and the
check every stored model (a train output's checkpoint, a Hugging Face directory) is held to.

``ModelFormatError`` is the one error a stored model that does not hold what it should
raises, naming the file or tensor; ``stages.convert`` calls it ``ConvertError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from stages.train.model import init_params
from stages.train.model_config import ModelConfig

Params = dict[str, Any]
"""A nested dict of arrays: ``layers/mlp/fc_in/kernel`` is ``params["layers"]["mlp"]...``."""
LeafPath = tuple[str, ...]
Shape = tuple[int, ...]


class ModelFormatError(ValueError):
    """A stored model that cannot be read as its config says; the message names the file or
    tensor."""


def leaf_at(tree: Params, path: LeafPath) -> Any:
    """The leaf of ``tree`` at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def set_leaf(tree: Params, path: LeafPath, value: Any) -> None:
    """Put ``value`` at ``path`` in ``tree``, adding the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def leaf_paths(tree: Any) -> dict[LeafPath, Any]:
    """Every leaf of a parameter tree (or of its shape metadata) by its path."""
    return {
        tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@cache
def expected_shapes(config: ModelConfig) -> dict[LeafPath, Shape]:
    """Every leaf of our parameter tree and its shape (layer-stacked leaves included); one
    trace of the model per config (callers must not change the dict)."""
    abstract = jax.eval_shape(lambda r: nn.unbox(init_params(config, r)), jax.random.key(0))
    return {path: tuple(leaf.shape) for path, leaf in leaf_paths(abstract).items()}


def leaf_shapes(params: Params) -> dict[LeafPath, Shape]:
    """The leaves of a parameter tree and their shapes."""
    return {path: tuple(np.shape(leaf)) for path, leaf in leaf_paths(params).items()}


def check_shapes(config: ModelConfig, found: Mapping[LeafPath, Shape], where: str) -> None:
    """Raise ModelFormatError naming the first missing, extra or wrongly shaped leaf."""
    expected = expected_shapes(config)
    for path, shape in expected.items():
        name = "/".join(path)
        if path not in found:
            raise ModelFormatError(f"{where}: tensor {name} is missing")
        if tuple(found[path]) != shape:
            raise ModelFormatError(
                f"{where}: tensor {name} has shape {found[path]}, expected {shape}"
            )
    extra = sorted("/".join(p) for p in found.keys() - expected.keys())
    if extra:
        raise ModelFormatError(f"{where}: unexpected tensors {', '.join(extra)}")


def check_params(config: ModelConfig, params: Params, where: str) -> None:
    """``check_shapes`` for a parameter tree."""
    check_shapes(config, leaf_shapes(params), where)
