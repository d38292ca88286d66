"""The one table from logical axis names to mesh axes, and helpers that apply it.

Mesh axes: ``slice`` (data parallel across TPU slices, over the data-centre network),
``data`` (pure data parallel), ``fsdp`` (data parallel whose replicas also split the
parameters and optimizer state) and ``model`` (tensor parallel over heads, MLP width and
vocabulary, as mesh-transformer-jax split GPT-J). The model names logical axes only;
this module is the single place that says where they go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache, partial

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from stages.train.model import init_params
from stages.train.model_config import ModelConfig

MESH_AXES = ("slice", "data", "fsdp", "model")

# Priority order matters: flax gives each logical axis the first rule whose mesh axes are
# still free in that array. Activations are (batch, length, embed): batch takes fsdp first,
# so their embed dim stays whole, while parameters' embed dim is split over fsdp.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("slice", "data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
    slices: int = 1,
) -> Mesh:
    """A (slice, data, fsdp, model) mesh: ``slices`` copies of a (data, fsdp, model) mesh
    within a slice, over ``devices`` (default: the first slices*data*fsdp*model)."""
    shape = (slices, data, fsdp, model)
    n = slices * data * fsdp * model
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None and slices > 1:
        # Within each slice along the interconnect, across slices over the network.
        grid = mesh_utils.create_hybrid_device_mesh((1, data, fsdp, model), (slices, 1, 1, 1))
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if devices is None and n == jax.device_count():
        # Over a whole slice, jax.make_mesh orders devices along the physical interconnect.
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    chosen = list(jax.devices()[:n] if devices is None else devices)
    if len(chosen) != n:
        raise ValueError(f"mesh {shape} needs {n} devices, got {len(chosen)}")
    return Mesh(np.array(chosen).reshape(shape), MESH_AXES, axis_types=axis_types)


@cache
def logical_axes(config: ModelConfig) -> dict:
    """The parameter tree with each leaf replaced by its logical PartitionSpec (computed once
    per config, since it traces the model: read it, do not change it)."""
    abstract = jax.eval_shape(partial(init_params, config), jax.random.key(0))
    return nn.get_partition_spec(abstract)


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """The parameter tree with each leaf replaced by its NamedSharding on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_axes(config), mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, length] token arrays."""
    spec = nn.logical_to_mesh_axes(("batch", "length"), LOGICAL_RULES)
    return NamedSharding(mesh, spec)


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [micro_batches, batch, length] token arrays (gradient accumulation)."""
    spec = nn.logical_to_mesh_axes((None, "batch", "length"), LOGICAL_RULES)
    return NamedSharding(mesh, spec)


def init_sharded(config: ModelConfig, mesh: Mesh, rng: jax.Array) -> dict:
    """Unboxed parameters initialised directly into their shards (never whole on one device)."""
    return _initializer(config, mesh)(rng)


@cache
def _initializer(config: ModelConfig, mesh: Mesh) -> Callable[[jax.Array], dict]:
    """One jitted initialiser per model and mesh, so that the shapes a trainer evaluates and
    the parameters it then initialises come from one trace of the model."""
    return jax.jit(
        lambda r: nn.unbox(init_params(config, r)), out_shardings=param_shardings(config, mesh)
    )


@contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Context in which tracing the model constrains its activations to ``mesh``."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield
