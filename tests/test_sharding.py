"""Sharding by the logical-axis rules on 8 virtual CPU devices equals one device.

JAX reads XLA_FLAGS once per process, so the checks run in a subprocess that executes this
file as a script with ``--xla_force_host_platform_device_count=8``; the test asserts on the
JSON report it prints.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest

from tests.virtual_devices import run_on_virtual_devices

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _worker() -> None:
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from stages.train import sharding
    from stages.train.model import forward, init_params
    from stages.train.model_config import gptj

    config = gptj(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ff=128, rotary_dim=8)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size)

    def loss(p: dict, t: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(forward(config, p, t[:, :-1]))
        return -jnp.take_along_axis(logp, t[:, 1:, None], axis=-1).mean()

    fwd = jax.jit(partial(forward, config))
    grad = jax.jit(jax.grad(loss))
    ref_logits, ref_grad = fwd(params, tokens), grad(params, tokens)

    def rel(a: jax.Array, b: jax.Array) -> float:
        return float(jnp.abs(a - b).max() / jnp.abs(b).max())

    report: dict = {"devices": jax.device_count(), "meshes": {}}
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        placed = jax.device_put(params, sharding.param_shardings(config, mesh))
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
        with sharding.activation_sharding(mesh):
            logits, g = fwd(placed, batch), grad(placed, batch)
        specs = jax.tree_util.tree_flatten_with_path(placed)[0]
        report["meshes"][str(shape)] = {
            "logits_error": rel(logits, ref_logits),
            "grad_error": max(jax.tree.leaves(jax.tree.map(rel, g, ref_grad))),
            "logits_spec": list(logits.sharding.spec),
            "param_specs": {jax.tree_util.keystr(k): list(v.sharding.spec) for k, v in specs},
        }
    mesh = sharding.make_mesh(2, 2, 2)
    initialised = sharding.init_sharded(config, mesh, jax.random.key(0))
    report["init_sharded_equal"] = jax.tree.all(jax.tree.map(np.array_equal, initialised, params))
    report["init_sharded_specs_match"] = jax.tree.all(
        jax.tree.map(
            lambda a, s: a.sharding.spec == s.spec,
            initialised,
            sharding.param_shardings(config, mesh),
        )
    )
    print(json.dumps(report))


@lru_cache(maxsize=1)
def sharded_report() -> dict:
    return run_on_virtual_devices(__file__, 8)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_and_gradient_equal_one_device(shape: tuple[int, int, int]) -> None:
    report = sharded_report()
    assert report["devices"] == 8
    result = report["meshes"][str(shape)]
    assert result["logits_error"] < 1e-5
    assert result["grad_error"] < 1e-5


def test_sharded_init_equals_unsharded_init_and_lands_in_its_shards() -> None:
    report = sharded_report()
    assert report["init_sharded_equal"]
    assert report["init_sharded_specs_match"]


def test_parameters_and_logits_are_sharded_by_the_rules() -> None:
    result = sharded_report()["meshes"][str((2, 2, 2))]
    specs = result["param_specs"]
    assert specs["['embed']['embedding']"] == ["model", "fsdp"]
    assert specs["['layers']['attn']['q']['kernel']"] == [None, "fsdp", "model", None]
    assert specs["['layers']['attn']['o']['kernel']"] == [None, "model", None, "fsdp"]
    assert specs["['layers']['mlp']['fc_in']['kernel']"] == [None, "fsdp", "model"]
    assert specs["['layers']['mlp']['fc_out']['bias']"] == [None, "fsdp"]
    assert specs["['lm_head']['kernel']"] == ["fsdp", "model"]
    assert specs["['ln_f']['scale']"] == ["fsdp"]
    # Activations: batch over data and fsdp, vocabulary over model.
    assert result["logits_spec"] == [["data", "fsdp"], None, "model"]


if __name__ == "__main__":
    _worker()
