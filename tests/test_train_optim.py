"""The training recipe: REFERENCE.md §3's schedule at its boundaries, decay only on
per-layer matrices, a zero first update, and gradient accumulation equal to one big batch."""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stages.train import optim
from stages.train.model import Transformer, init_params
from stages.train.model_config import preset

GPTJ = optim.OptimizerConfig()


def reference_lr(s: int, lr: float, end: float, warmup: int, anneal: int) -> float:
    """REFERENCE.md §3 in plain Python: linear warmup, cosine over anneal, then flat."""
    if s < warmup:
        return lr * s / warmup
    t = min(s - warmup, anneal) / anneal
    return end + (lr - end) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (1500, 0.6e-4),
        (3000, 1.2e-4),
        (3000 + 150000, (1.2e-4 + 1.2e-5) / 2),
        (303000, 1.2e-5),
        (350000, 1.2e-5),
    ],
)
def test_gptj_schedule_at_its_boundaries(step: int, expected: float) -> None:
    lr = float(optim.schedule(GPTJ)(step))
    assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert lr == pytest.approx(reference_lr(step, 1.2e-4, 1.2e-5, 3000, 300000), rel=1e-6)


def test_recipes_fill_unset_fields_and_keep_overrides() -> None:
    assert (GPTJ.lr, GPTJ.end_lr, GPTJ.warmup_steps, GPTJ.anneal_steps) == (
        1.2e-4,
        1.2e-5,
        3000,
        300000,
    )
    assert (GPTJ.weight_decay, GPTJ.b1, GPTJ.b2, GPTJ.eps, GPTJ.clip) == (0.1, 0.9, 0.999, 1e-8, 1)
    neox = optim.OptimizerConfig(recipe="neox-20b", warmup_steps=10)
    assert (neox.b2, neox.weight_decay, neox.lr, neox.warmup_steps) == (0.95, 0.01, 0.97e-4, 10)
    with pytest.raises(ValueError, match="unknown optimizer recipe"):
        optim.OptimizerConfig(recipe="adafactor")


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    config = preset("gptj-tiny", n_layers=2)
    return nn.unbox(init_params(config, jax.random.key(0)))


def test_decay_mask_skips_biases_and_norms_even_when_stacked(tiny_params: dict) -> None:
    mask = optim.decay_mask(tiny_params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted(
        [
            "['embed']['embedding']",
            "['layers']['attn']['k']['kernel']",
            "['layers']['attn']['o']['kernel']",
            "['layers']['attn']['q']['kernel']",
            "['layers']['attn']['v']['kernel']",
            "['layers']['mlp']['fc_in']['kernel']",
            "['layers']['mlp']['fc_out']['kernel']",
            "['lm_head']['kernel']",
        ]
    )
    # [L, D] norm scales and biases are 2-D arrays but vectors per layer.
    assert tiny_params["layers"]["ln_1"]["scale"].ndim == 2
    assert not flat["['layers']['ln_1']['scale']"]


def test_first_update_is_zero_then_decay_hits_matrices_only(tiny_params: dict) -> None:
    config = optim.OptimizerConfig(warmup_steps=4, anneal_steps=10, weight_decay=0.5)
    tx = optim.optimizer(config, grad_accum=2)
    update = jax.jit(tx.update)
    state = tx.init(tiny_params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), tiny_params)
    first, state = update(grads, state, tiny_params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(first))
    # Zero gradients make Adam's step zero (its moments decay but stay finite), leaving
    # only the decoupled decay: -lr(1) * wd * p on matrices, nothing elsewhere.
    zeros = jax.tree.map(jnp.zeros_like, tiny_params)
    state = tx.init(tiny_params)
    _, state = update(zeros, state, tiny_params)
    second, _ = update(zeros, state, tiny_params)
    lr1 = config.lr / 4
    kernel = tiny_params["layers"]["mlp"]["fc_in"]["kernel"]
    np.testing.assert_allclose(
        second["layers"]["mlp"]["fc_in"]["kernel"], -lr1 * 0.5 * kernel, rtol=1e-5
    )
    assert float(jnp.abs(second["layers"]["mlp"]["fc_in"]["bias"]).max()) == 0.0
    assert float(jnp.abs(second["ln_f"]["scale"]).max()) == 0.0


def test_clip_sees_the_mean_gradient_of_the_accumulated_sum(tiny_params: dict) -> None:
    """scale(1/GAS) comes before the clip: a sum of GAS gradients of norm 0.6 is not clipped,
    so after Adam's first (sign-like) step the update direction is unchanged."""
    config = optim.OptimizerConfig(warmup_steps=1, anneal_steps=10, weight_decay=0.0)
    tx = optim.optimizer(config, grad_accum=4)
    state = tx.init(tiny_params)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, tiny_params), state, tiny_params)
    leaves = jax.tree.leaves(tiny_params)
    one = jax.tree.map(jnp.ones_like, tiny_params)
    norm = math.sqrt(sum(p.size for p in leaves))
    summed = jax.tree.map(lambda g: g * 4 * 0.6 / norm, one)
    updates, _ = tx.update(summed, state, tiny_params)
    # Adam's bias-corrected second step with g=const: m_hat/sqrt(v_hat) is the same for all.
    values = np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)])
    np.testing.assert_allclose(values, values[0], rtol=1e-5)
    assert values[0] < 0


def test_accumulated_step_equals_one_big_batch() -> None:
    config = preset("gptj-tiny", n_layers=2, vocab_size=256)
    params = nn.unbox(init_params(config, jax.random.key(1)))
    rows = jax.random.randint(jax.random.key(2), (4, 17), 0, 256)
    opt = optim.OptimizerConfig(warmup_steps=1, anneal_steps=10)
    lr = optim.schedule(opt)

    def run(gas: int) -> tuple:
        tx = optim.optimizer(opt, grad_accum=gas)
        state = tx.init(params)
        step = jax.jit(partial(optim.train_step, config, tx, lr))
        p, state, m0 = step(params, state, jnp.int32(0), rows.reshape(gas, 4 // gas, 17))
        p, state, m1 = step(p, state, jnp.int32(1), rows.reshape(gas, 4 // gas, 17))
        p, _, m2 = step(p, state, jnp.int32(2), rows.reshape(gas, 4 // gas, 17))
        return p, (m0, m1, m2)

    p1, a = run(1)
    p2, b = run(2)
    expected_lr = [reference_lr(s, 1.2e-4, 1.2e-5, 1, 10) for s in range(3)]
    assert [float(m["lr"]) for m in a] == pytest.approx(expected_lr, rel=1e-6)
    # The first update has lr 0: the second step sees the initial params.
    assert float(a[1]["loss"]) == float(a[0]["loss"])
    assert float(a[2]["loss"]) < float(a[1]["loss"])
    for x, y in zip(a, b, strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-5)
        assert float(x["grad_norm"]) == pytest.approx(float(y["grad_norm"]), rel=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6), p1, p2)


def test_z_loss_adds_the_squared_log_partition() -> None:
    config = preset("gptj-tiny", n_layers=1, vocab_size=128)
    params = nn.unbox(init_params(config, jax.random.key(3)))
    rows = jax.random.randint(jax.random.key(4), (2, 9), 0, 128)
    loss = jax.jit(partial(optim.lm_loss, config), static_argnames="z_loss")
    plain, ce = loss(params, rows)
    with_z, ce_z = loss(params, rows, z_loss=1e-2)
    logits = jax.jit(Transformer(config).apply)({"params": params}, rows[:, :-1])
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    assert float(plain) == float(ce)
    assert float(ce_z) == pytest.approx(float(ce), rel=1e-6)
    assert float(with_z - plain) == pytest.approx(1e-2 * np.mean(lse**2), rel=1e-4)
