"""The model against Hugging Face: configs, parameter counts, name mapping and logit parity.

Hugging Face models are built from configs with random weights (no hub access), in float32
with eager attention; their state dicts go through our mapping into our model.
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from pydantic import ValidationError

from stages.train.hf_mapping import (
    config_from_hf,
    hf_config,
    params_from_hf,
    params_to_hf,
    tensor_rules,
)
from stages.train.model import forward, init_params
from stages.train.model_config import PRESETS, ModelConfig, gptj, neox, param_count, preset

PARITY_CONFIGS = {
    # Odd head count, head_dim 12, rotary_dim 6: nothing a multiple of 64.
    "gptj-odd-heads": gptj(
        vocab_size=211, d_model=60, n_layers=2, n_heads=5, d_ff=96, rotary_dim=6
    ),
    "gptj-full-rotary-exact-gelu": gptj(
        vocab_size=128, d_model=64, n_layers=3, n_heads=2, d_ff=80, rotary_dim=32, activation="gelu"
    ),
    "neox-sequential-7-heads": neox(
        vocab_size=150, d_model=56, n_layers=3, n_heads=7, rotary_pct=0.5, parallel_residual=False
    ),
    "neox-parallel-gelu-fast": neox(
        vocab_size=96, d_model=48, n_layers=2, n_heads=3, rotary_pct=0.25, activation="gelu_fast"
    ),
    "neox-no-attn-bias-full-rotary": neox(
        vocab_size=100,
        d_model=32,
        n_layers=2,
        n_heads=4,
        rotary_pct=1.0,
        attn_bias=False,
        activation="gelu_new",
        rotary_base=500.0,
        parallel_residual=False,
    ),
}

# The tightest bar the issue allows is 1e-4; float32 reorderings give ~1e-6 here.
MAX_RELATIVE_ERROR = 1e-5


@cache
def hf_random_model(config: ModelConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A transformers model of this config whose every weight (norms and biases too) is random.

    Cached per config: tests only read it."""
    fields = hf_config(config)
    hf_conf = transformers.AutoConfig.for_model(
        fields.pop("model_type"), bos_token_id=None, eos_token_id=None, **fields
    )
    model = transformers.AutoModelForCausalLM.from_config(
        hf_conf, attn_implementation="eager", dtype=torch.float32
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and ("norm" in name or "ln_" in name) and "weight" in name
            p.normal_(mean=1.0 if is_norm_scale else 0.0, std=0.3 if p.ndim > 1 else 0.2)
    return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def padded_batch(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [4, 12] with left-padded, right-padded, unpadded and one-token rows, and mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (4, 12))
    mask = np.ones((4, 12), bool)
    mask[0, :5] = False
    mask[1, 9:] = False
    mask[3, :11] = False
    return tokens, mask


def test_gptj_6b_parameter_count_is_hugging_faces() -> None:
    assert param_count(PRESETS["gptj-6b"]) == 6_050_882_784


def test_neox_and_pythia_parameter_counts_match_published_totals() -> None:
    published = {
        "neox-20b": 20_554_567_680,
        "pythia-70m": 70_426_624,
        "pythia-160m": 162_322_944,
        "pythia-410m": 405_334_016,
        "pythia-1b": 1_011_781_632,
        "pythia-1.4b": 1_414_647_808,
        "pythia-2.8b": 2_775_208_960,
        "pythia-6.9b": 6_857_302_016,
        "pythia-12b": 11_846_072_320,
    }
    assert {name: param_count(PRESETS[name]) for name in published} == published


@pytest.mark.parametrize("name", ["gptj-6b", "neox-20b", "pythia-1b"])
def test_param_count_equals_the_initialised_tree(name: str) -> None:
    abstract = jax.eval_shape(lambda r: nn.unbox(init_params(PRESETS[name], r)), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(abstract)) == param_count(PRESETS[name])


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_param_count_equals_transformers(name: str) -> None:
    config = PARITY_CONFIGS[name]
    assert hf_random_model(config).num_parameters() == param_count(config)


def test_gptj_6b_preset_has_the_6b_roto_256_shapes() -> None:
    config = PRESETS["gptj-6b"]
    shape = (config.n_layers, config.d_model, config.n_heads, config.head_dim, config.rotary_dim)
    assert shape == (28, 4096, 16, 256, 64)
    assert (config.vocab_size, config.d_ff, config.lm_head_bias) == (50400, 16384, True)


def test_preset_overrides_are_revalidated() -> None:
    assert preset("gptj-tiny", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValidationError):
        preset("gptj-tiny", rotary_dim=7)
    with pytest.raises(KeyError):
        preset("gpt-5")


@pytest.mark.parametrize(
    "bad",
    [
        dict(attn_bias=True),  # GPT-J has no q/k/v/o biases in transformers
        dict(n_heads=3),  # 64 is not a multiple of 3
        dict(rotary_dim=18),  # larger than head_dim 16
        dict(lm_head_bias=False),
    ],
)
def test_config_rejects_what_hugging_face_cannot_express(bad: dict) -> None:
    fields = dict(vocab_size=50, d_model=64, n_layers=1, n_heads=4, d_ff=64, rotary_dim=8)
    with pytest.raises(ValidationError):
        gptj(**{**fields, **bad})


def test_every_parameter_has_logical_axis_names() -> None:
    boxed = init_params(PARITY_CONFIGS["neox-sequential-7-heads"], jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)
    assert all(
        leaf.names[0] == "layers"
        for leaf in jax.tree.leaves(
            boxed["layers"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
    )
    vocabulary = {"vocab", "embed", "heads", "head_dim", "mlp", "layers"}
    assert {n for leaf in leaves for n in leaf.names} == vocabulary


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    config = PARITY_CONFIGS[name]
    model = hf_random_model(config)
    params = params_from_hf(config, state_dict_numpy(model))
    tokens, mask = padded_batch(config.vocab_size, seed=1)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref_full = model(torch.tensor(tokens)).logits.numpy()
        ref_padded = model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        ).logits.numpy()

    ours_full = np.asarray(forward(config, params, jnp.asarray(tokens)))
    ours_padded = np.asarray(forward(config, params, jnp.asarray(tokens), jnp.asarray(mask)))

    assert relative_error(ours_full, ref_full) <= MAX_RELATIVE_ERROR
    assert relative_error(ours_padded[mask], ref_padded[mask]) <= MAX_RELATIVE_ERROR


def test_left_padding_does_not_change_a_rows_logits() -> None:
    config = PARITY_CONFIGS["gptj-odd-heads"]
    params = params_from_hf(config, state_dict_numpy(hf_random_model(config)))
    tokens, mask = padded_batch(config.vocab_size, seed=2)
    padded = np.asarray(forward(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
    alone = np.asarray(forward(config, params, jnp.asarray(tokens[:1, 5:])))
    assert relative_error(padded[0, 5:], alone[0]) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("name", ["gptj-odd-heads", "neox-sequential-7-heads"])
def test_mapping_round_trips_exactly(name: str) -> None:
    config = PARITY_CONFIGS[name]
    state = state_dict_numpy(hf_random_model(config))
    params = params_from_hf(config, state)
    back = params_to_hf(config, params)
    live = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in back.items()}
    assert live.keys() == state.keys()
    assert all(np.array_equal(live[k], state[k]) for k in state)
    again = params_from_hf(config, back)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, params))


def test_neox_fused_qkv_rows_are_head_major() -> None:
    config = PARITY_CONFIGS["neox-parallel-gelu-fast"]
    state = state_dict_numpy(hf_random_model(config))
    params = params_from_hf(config, state)
    dh = config.head_dim
    fused = state["gpt_neox.layers.1.attention.query_key_value.weight"]
    # Row head*3*Dh + {q:0, k:1, v:2}*Dh + d, per REFERENCE.md section 2.
    head, d = 2, 5
    assert np.array_equal(
        fused[head * 3 * dh + 1 * dh + d], params["layers"]["attn"]["k"]["kernel"][1, :, head, d]
    )
    assert np.array_equal(
        state["gpt_neox.layers.1.attention.query_key_value.bias"][head * 3 * dh + 2 * dh + d],
        params["layers"]["attn"]["v"]["bias"][1, head, d],
    )


def test_mapping_names_are_the_published_checkpoint_names() -> None:
    neox_names = {r.hf_name for r in tensor_rules(PARITY_CONFIGS["neox-parallel-gelu-fast"])}
    gptj_names = {r.hf_name for r in tensor_rules(PARITY_CONFIGS["gptj-odd-heads"])}
    assert {"embed_out.weight", "gpt_neox.embed_in.weight"} <= neox_names
    assert {"lm_head.weight", "lm_head.bias", "transformer.wte.weight"} <= gptj_names
    assert "transformer.h.{i}.attn.q_proj.weight" in gptj_names


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_config_survives_transformers_config(name: str) -> None:
    config = PARITY_CONFIGS[name]
    hf_dict = hf_random_model(config).config.to_dict()
    assert config_from_hf(hf_dict) == config
    assert hf_dict["tie_word_embeddings"] is False


@pytest.mark.parametrize("name", ["gptj-6b", "neox-20b", "pythia-2.8b"])
def test_preset_config_survives_hf_config(name: str) -> None:
    assert config_from_hf(hf_config(PRESETS[name])) == PRESETS[name]


def test_remat_and_unrolled_scan_change_nothing_numerically() -> None:
    base = PARITY_CONFIGS["neox-sequential-7-heads"]
    params = nn.unbox(init_params(base, jax.random.key(3)))
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, base.vocab_size)

    def cross_entropy(config: ModelConfig, p: dict) -> jax.Array:
        logp = jax.nn.log_softmax(forward(config, p, tokens[:, :-1]))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    def loss_and_grad(config: ModelConfig) -> tuple[jax.Array, dict]:
        return jax.jit(jax.value_and_grad(lambda p: cross_entropy(config, p)))(params)

    ref_loss, ref_grad = loss_and_grad(base)
    for variant in (
        base.model_copy(update={"remat": "full"}),
        base.model_copy(update={"remat": "dots_no_batch", "scan_unroll": 3}),
    ):
        loss, grad = loss_and_grad(variant)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
        errors = jax.tree.map(
            lambda a, b: relative_error(np.asarray(a), np.asarray(b)), grad, ref_grad
        )
        assert max(jax.tree.leaves(errors)) < 1e-5


def test_bfloat16_compute_keeps_float32_params_and_logits() -> None:
    config = PARITY_CONFIGS["gptj-odd-heads"]
    params = params_from_hf(config, state_dict_numpy(hf_random_model(config)))
    tokens, _ = padded_batch(config.vocab_size, seed=5)
    bf16 = config.model_copy(update={"dtype": "bfloat16"})
    boxed = jax.eval_shape(lambda r: nn.unbox(init_params(bf16, r)), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(boxed)} == {jnp.dtype("float32")}
    low = np.asarray(forward(bf16, params, jnp.asarray(tokens)))
    full = np.asarray(forward(config, params, jnp.asarray(tokens)))
    assert low.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: a few percent of the logit range after 2 layers.
    assert relative_error(low, full) < 0.05


def test_rotary_pct_survives_float_truncation_in_transformers() -> None:
    # 26/46 * 46 evaluates to 25.999..., which transformers' int() would cut to 25 dims.
    config = neox(vocab_size=64, d_model=92, n_heads=2, n_layers=1, rotary_dim=26)
    fields = hf_config(config)
    hf_conf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert int(config.head_dim * hf_conf.rope_parameters["partial_rotary_factor"]) == 26
    assert config_from_hf(hf_conf.to_dict()) == config


def test_unsupported_hugging_face_configs_are_refused() -> None:
    gptj_fields = hf_config(PARITY_CONFIGS["gptj-odd-heads"])
    with pytest.raises(ValueError, match="rotary_dim"):
        config_from_hf({**gptj_fields, "rotary_dim": None})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**gptj_fields, "model_type": "llama"})


def test_highest_matmul_precision_reaches_every_matmul() -> None:
    # On TPU/GPU "default" float32 matmuls round inputs; evaluation asks for "highest".
    config = PARITY_CONFIGS["neox-parallel-gelu-fast"].model_copy(
        update={"matmul_precision": "highest"}
    )
    params = jax.eval_shape(lambda r: nn.unbox(init_params(config, r)), jax.random.key(0))
    text = forward.lower(config, params, jnp.zeros((1, 4), jnp.int32)).as_text()
    # q, k, v, o, scores, weighted values, fc_in, fc_out, lm_head
    assert text.count("dot_general") == 9
    assert text.count("precision = [HIGHEST, HIGHEST]") == 9
