"""Selectable attention (``ModelConfig.attention``): splash equals XLA, which kernel auto picks.

Splash runs here in Pallas interpret mode on CPU; its parity with the XLA path (logits and
gradients, one device and a (2, 2, 2) mesh of 8 virtual devices) runs in one subprocess,
since JAX reads XLA_FLAGS once per process. cuDNN parity needs an NVIDIA GPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from stages.train.attention import resolve_attention
from stages.train.model import KVCache, Transformer, forward, init_params
from stages.train.model_config import ModelConfig, preset
from stages.train.output import model_config_json
from tests.virtual_devices import run_on_virtual_devices

# Splash blocks are multiples of 128 tokens; the heads split over the mesh's model axis of 2.
SEQ = 128
FAMILIES = {
    "gptj": ("gptj-tiny", dict(vocab_size=256, n_layers=2)),  # 4 heads of 32
    "neox": ("pythia-70m", dict(vocab_size=256, d_model=128, n_layers=2, n_heads=2, d_ff=256)),
}
# Largest difference over the largest reference value; float32 reorderings (splash's blockwise
# online softmax) give ~1e-6 here.
TOLERANCE = 1e-4


def family(name: str, **overrides: object) -> ModelConfig:
    base, fields = FAMILIES[name]
    return preset(base, **fields, matmul_precision="highest", **overrides)


def _worker() -> None:
    from stages.train import sharding

    def loss(config: ModelConfig, p: dict, t: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(forward(config, p, t[:, :-1]))
        return -jnp.take_along_axis(logp, t[:, 1:, None], axis=-1).mean()

    def error(a: jax.Array, b: jax.Array) -> float:
        return float(jnp.abs(a - b).max() / jnp.abs(b).max())

    report: dict = {"devices": jax.device_count()}
    mesh = sharding.make_mesh(2, 2, 2)
    for name in FAMILIES:
        xla, splash = family(name, attention="xla"), family(name, attention="splash")
        params = nn.unbox(init_params(xla, jax.random.key(0)))
        tokens = jax.random.randint(jax.random.key(1), (4, SEQ + 1), 0, xla.vocab_size)
        ref_logits, ref_grads = (
            forward(xla, params, tokens[:, :-1]),
            jax.grad(loss, 1)(xla, params, tokens),
        )
        placed = jax.device_put(params, sharding.param_shardings(splash, mesh))
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
        runs = {
            "one device": (params, tokens, nullcontext()),
            "mesh (2, 2, 2)": (placed, batch, sharding.activation_sharding(mesh)),
        }
        for where, (p, t, context) in runs.items():
            with context:
                logits = forward(splash, p, t[:, :-1])
                grads = jax.grad(loss, 1)(splash, p, t)
                program = str(jax.make_jaxpr(forward, static_argnums=0)(splash, p, t[:, :-1]))
            report[f"{name} {where}"] = {
                "logits_error": error(logits, ref_logits),
                "grad_error": max(jax.tree.leaves(jax.tree.map(error, grads, ref_grads))),
                "pallas": "pallas_call" in program,
                "shard_map": "shard_map" in program,
            }
    print(json.dumps(report))


@lru_cache(maxsize=1)
def splash_report() -> dict:
    return run_on_virtual_devices(__file__, 8)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("where", ["one device", "mesh (2, 2, 2)"])
def test_splash_logits_and_gradients_equal_xla(name: str, where: str) -> None:
    report = splash_report()
    assert report["devices"] == 8
    result = report[f"{name} {where}"]
    assert result["pallas"], "the splash kernel was not in the program"
    # Under a mesh the kernel runs per shard; on one device it is called directly.
    assert result["shard_map"] == (where != "one device")
    assert result["logits_error"] < TOLERANCE
    assert result["grad_error"] < TOLERANCE


def _pallas_free(function: Callable[[], jax.Array]) -> bool:
    """No Pallas kernel in what ``function`` traces to."""
    return "pallas_call" not in str(jax.make_jaxpr(function)())


def test_padded_batch_and_kv_cache_take_the_xla_path() -> None:
    xla, splash = family("gptj", attention="xla"), family("gptj", attention="splash")
    params = nn.unbox(init_params(xla, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, xla.vocab_size)
    mask = jnp.ones(tokens.shape, bool).at[0, :5].set(False)  # row 0 left-padded

    def padded(config: ModelConfig) -> jax.Array:
        return forward(config, params, tokens, mask)

    def cached(config: ModelConfig) -> jax.Array:
        # No mask, but a cache: the keys are the cache's slots, not a causal square.
        cache = KVCache.empty(config, batch=2, length=SEQ + 8)
        decode = Transformer(config).apply
        logits, cache = decode({"params": params}, tokens, cache, method=Transformer.decode)
        step, _ = decode({"params": params}, tokens[:, :1], cache, method=Transformer.decode)
        return jnp.concatenate([logits, step], axis=1)

    for run in (padded, cached):
        assert _pallas_free(partial(run, splash))
        compute = jax.jit(run, static_argnums=0)
        np.testing.assert_array_equal(compute(splash), compute(xla))


def _shape(head_dim: int, **fields: object) -> ModelConfig:
    """A two-head config of this head size."""
    return preset("gptj-tiny", d_model=2 * head_dim, n_heads=2, rotary_dim=8, **fields)


BF16 = dict(dtype="bfloat16")
RESOLVE_CASES = [
    # (config, backend, device_kind, compute capability, kernel, logged fallback)
    (_shape(64, **BF16), "gpu", "NVIDIA A100-SXM4-80GB", "8.0", "cudnn", None),
    (_shape(128, **BF16), "gpu", "NVIDIA A100-SXM4-80GB", "8.0", "cudnn", None),
    (_shape(256, **BF16), "gpu", "NVIDIA A100-SXM4-80GB", "8.0", "xla", "at most 128"),
    (_shape(256, **BF16), "gpu", "NVIDIA H100 80GB HBM3", "9.0", "cudnn", None),
    (_shape(96, **BF16), "gpu", "NVIDIA H100 80GB HBM3", "9.0", "cudnn", None),
    (_shape(12, **BF16), "gpu", "NVIDIA H100 80GB HBM3", "9.0", "xla", "multiple of 8"),
    (_shape(264, **BF16), "gpu", "NVIDIA B200", "10.0", "xla", "at most 256"),
    (_shape(64), "gpu", "NVIDIA H100 80GB HBM3", "9.0", "xla", "bfloat16"),
    (_shape(64, **BF16), "gpu", "AMD Instinct MI300X", "gfx942", "xla", "not an NVIDIA"),
    (_shape(64, **BF16), "tpu", "TPU v4", None, "splash", None),
    (_shape(256), "tpu", "TPU v5 lite", None, "splash", None),
    (_shape(64, **BF16), "tpu", "TPU v3", None, "xla", "TPU v3"),
    (_shape(64, **BF16), "cpu", "cpu", None, "xla", None),
    (_shape(64, attention="xla", **BF16), "gpu", "NVIDIA H100 80GB HBM3", "9.0", "xla", None),
    (_shape(64, attention="xla"), "tpu", "TPU v5p", None, "xla", None),
    (_shape(64, attention="splash"), "cpu", "cpu", None, "splash", None),
    (_shape(64, attention="splash"), "tpu", "TPU v3", None, "splash", None),
    (_shape(256, attention="cudnn", **BF16), "gpu", "NVIDIA H100", "9.0", "cudnn", None),
]


@pytest.mark.parametrize("config, backend, kind, capability, kernel, why", RESOLVE_CASES)
def test_resolve_attention_picks_per_platform(
    config: ModelConfig,
    backend: str,
    kind: str,
    capability: str | None,
    kernel: str,
    why: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="stages.train.attention"):
        assert resolve_attention(config, backend, kind, capability) == kernel
    if why is None:
        assert not caplog.records
    else:
        (record,) = caplog.records
        assert why in record.getMessage() and "XLA" in record.getMessage()


def test_explicit_cudnn_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="attention='cudnn' needs dtype='bfloat16'"):
        _shape(64, attention="cudnn")
    with pytest.raises(ValueError, match="ModelConfig.attention='cudnn'.*at most 128"):
        resolve_attention(_shape(256, attention="cudnn", **BF16), "gpu", "NVIDIA A100", "8.0")
    with pytest.raises(ValueError, match="ModelConfig.attention='cudnn'.*backend is tpu"):
        resolve_attention(_shape(64, attention="cudnn", **BF16), "tpu", "TPU v5p", None)


def test_model_config_json_leaves_attention_out() -> None:
    auto = family("gptj")
    text = model_config_json(family("gptj", attention="splash"))
    # Byte for byte what the file held before the field existed, and read back as "auto".
    assert text == auto.model_dump_json(indent=1).replace(',\n "attention": "auto"', "")
    assert "attention" not in text
    assert ModelConfig.model_validate_json(text) == auto


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN flash attention needs an NVIDIA GPU; no GPU on this machine",
)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cudnn_logits_match_xla_in_bfloat16(name: str) -> None:
    xla = family(name, attention="xla", dtype="bfloat16", matmul_precision="default")
    cudnn = family(name, attention="cudnn", dtype="bfloat16", matmul_precision="default")
    params = nn.unbox(init_params(xla, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (4, SEQ), 0, xla.vocab_size)
    assert "__cudnn$fmha" in forward.lower(cudnn, params, tokens).as_text()
    ours, ref = forward(cudnn, params, tokens), forward(xla, params, tokens)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operand). The XLA
    # path rounds the softmax weights to bfloat16 before the weighted sum of values, cuDNN
    # keeps them in float32 tiles; two layers of such differences, carried through the MLP
    # and lm_head in bfloat16, stay within ~1e-2 on logits of order 1: 2e-2 leaves headroom.
    np.testing.assert_allclose(ours, ref, atol=2e-2, rtol=0)


if __name__ == "__main__":
    _worker()
