"""KV-cache generation: cached logits equal full recompute, greedy equals transformers, sampling
filters keep what they promise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from stages.train.generate import Sampling, filter_logits, generate, left_pad
from stages.train.hf_mapping import to_transformers
from stages.train.model import KVCache, Transformer, forward, init_params
from stages.train.model_config import ModelConfig, gptj, neox

CONFIGS = {
    "gptj": gptj(vocab_size=97, d_model=40, n_layers=2, n_heads=5, d_ff=64, rotary_dim=4),
    "neox": neox(vocab_size=89, d_model=48, n_layers=2, n_heads=3, rotary_pct=0.5),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [3], [40, 41, 42, 43]]
# One prompt shape and one length everywhere, so the jitted loop compiles once per config.
STEPS = 8


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Initialised parameters with matrices scaled up so that greedy choices are decisive."""
    params = nn.unbox(init_params(config, jax.random.key(seed)))
    return jax.tree.map(lambda x: x * 4.0 if x.ndim > 2 else x, params)


def hf_greedy(config: ModelConfig, params: dict, steps: int, eos_id: int | None) -> np.ndarray:
    """transformers' greedy continuation of PROMPTS (left-padded, with attention mask)."""
    model = to_transformers(config, params, bos_token_id=None, eos_token_id=None)
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    out = model.generate(
        torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=0,
    )
    new = out[:, tokens.shape[1] :].numpy()
    # transformers stops the batch once every row is done; ours always returns `steps`.
    return np.pad(new, ((0, 0), (0, steps - new.shape[1])))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_matches_transformers(arch: str) -> None:
    config = CONFIGS[arch]
    params = random_params(config)
    ours = generate(config, params, PROMPTS, max_new_tokens=STEPS)
    np.testing.assert_array_equal(ours, hf_greedy(config, params, STEPS, eos_id=None))
    # The continuations are not degenerate: rows differ and tokens vary.
    assert len({tuple(row) for row in ours}) == len(PROMPTS)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_generation_stops_at_eos_like_transformers(arch: str) -> None:
    config = CONFIGS[arch]
    params = random_params(config)
    free = generate(config, params, PROMPTS, max_new_tokens=STEPS)
    # The first token row 0 emits at step >= 1 that it did not emit before; other rows may
    # emit it earlier, later or never.
    step = next(j for j in range(1, STEPS) if free[0, j] not in free[0, :j])
    eos = int(free[0, step])
    ours = generate(config, params, PROMPTS, max_new_tokens=STEPS, eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(ours, hf_greedy(config, params, STEPS, eos_id=eos))
    assert ours[0, step] == eos and (ours[0, step + 1 :] == 0).all()
    np.testing.assert_array_equal(ours[0, :step], free[0, :step])


def test_generation_stops_when_every_row_is_done() -> None:
    config = CONFIGS["gptj"]
    params = random_params(config)
    same = [PROMPTS[0]] * len(PROMPTS)
    first = int(generate(config, params, same, max_new_tokens=STEPS)[0, 0])
    out = generate(config, params, same, max_new_tokens=STEPS, eos_id=first, pad_id=-1)
    assert out.tolist() == [[first] + [-1] * (STEPS - 1)] * len(PROMPTS)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cached_decoding_equals_full_recompute(arch: str) -> None:
    config = CONFIGS[arch]
    params = random_params(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (3, 10)).astype(np.int32)
    mask = np.ones((3, 10), bool)
    mask[1, :3] = False  # left padding
    mask[2, :6] = False
    full = np.asarray(forward(config, params, jnp.asarray(tokens), jnp.asarray(mask)))

    model = Transformer(config)
    decode = jax.jit(
        lambda p, t, c, m: model.apply({"params": p}, t, c, m, method=Transformer.decode)
    )
    cache = KVCache.empty(config, batch=3, length=12)
    logits, cache = decode(params, tokens[:, :4], cache, mask[:, :4])  # prefill
    steps = [np.asarray(logits)]
    for i in range(4, 10):
        logits, cache = decode(params, tokens[:, i : i + 1], cache, mask[:, i : i + 1])
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)

    assert int(cache.index) == 10
    error = np.abs(cached - full)[mask].max() / np.abs(full[mask]).max()
    assert error < 1e-5


def test_top_k_and_top_p_keep_exactly_the_promised_tokens() -> None:
    logits = jnp.log(jnp.array([[0.4, 0.25, 0.2, 0.1, 0.05], [0.05, 0.1, 0.6, 0.15, 0.1]]))

    def kept(sampling: Sampling) -> np.ndarray:
        return np.isfinite(np.asarray(filter_logits(logits, sampling)))

    assert kept(Sampling(temperature=1.0, top_k=2)).tolist() == [
        [True, True, False, False, False],
        [False, False, True, True, False],
    ]
    # Smallest set of most likely tokens whose mass reaches p: 0.4+0.25 >= 0.6; 0.6 >= 0.6.
    assert kept(Sampling(temperature=1.0, top_p=0.6)).tolist() == [
        [True, True, False, False, False],
        [False, False, True, False, False],
    ]
    assert kept(Sampling(temperature=1.0, top_p=0.7)).tolist()[0] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_temperature_scales_logits() -> None:
    logits = jnp.array([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(filter_logits(logits, Sampling(temperature=0.5)), logits * 2)


def test_sampling_is_reproducible_and_respects_top_k() -> None:
    config = CONFIGS["neox"]
    params = random_params(config)
    sampling = Sampling(temperature=1.5, top_k=3)
    a = generate(config, params, PROMPTS, STEPS, sampling, rng=jax.random.key(7))
    b = generate(config, params, PROMPTS, STEPS, sampling, rng=jax.random.key(7))
    c = generate(config, params, PROMPTS, STEPS, sampling, rng=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Every sampled token is among the 3 most likely at its step (checked by recompute).
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    seq = np.concatenate([tokens, a], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(a, bool)], axis=1)
    logits = np.asarray(forward(config, params, jnp.asarray(seq), jnp.asarray(full_mask)))
    width = tokens.shape[1]
    for step in range(a.shape[1]):
        top3 = np.argsort(logits[:, width - 1 + step], axis=-1)[:, -3:]
        assert all(a[row, step] in top3[row] for row in range(len(PROMPTS)))


def test_sampling_without_rng_is_refused() -> None:
    with pytest.raises(ValueError, match="rng"):
        generate(CONFIGS["gptj"], {}, PROMPTS, STEPS, Sampling(temperature=1.0))


def test_generation_beyond_the_context_is_refused() -> None:
    config = CONFIGS["gptj"].model_copy(update={"max_len": 10})
    with pytest.raises(ValueError, match="max_len"):
        generate(config, {}, PROMPTS, 5)


def test_left_pad_aligns_prompts_right() -> None:
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError):
        left_pad([[1], []], pad_id=0)
