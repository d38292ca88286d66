"""Text generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling.

Prompts of different lengths are left-padded into one batch, to a power-of-two width so
that few shapes compile; the prompt is run once (prefill) and every new token costs one
cached decoding step. The whole loop is one jitted ``lax.while_loop`` that stops when every
row has produced EOS or ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from stages.train.model import KVCache, Transformer
from stages.train.model_config import ModelConfig

Array = jax.Array


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """0 picks the most likely token (greedy); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches p (1: all)."""


GREEDY = Sampling()


def padded_width(longest: int, room: int) -> int:
    """The prompt width a batch is padded to: the next power of two of its longest prompt
    (at least 16), so a run of prompts of any lengths compiles a handful of loops, capped by
    ``room`` (the cache slots the new tokens leave)."""
    return max(longest, min(room, max(16, 1 << (longest - 1).bit_length())))


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, width] right-aligned with ``pad_id`` before them, and their mask
    [B, width]; ``width`` defaults to the longest prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(width or 0, max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    return tokens, mask


def filter_logits(logits: Array, sampling: Sampling) -> Array:
    """Logits [B, V] scaled by temperature with tokens outside top-k / top-p set to -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token stays if the mass of the tokens ranked above it is below p; the top one
        # always stays.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < sampling.top_p, ordered, jnp.inf)
        logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def choose(logits: Array, sampling: Sampling, rng: Array) -> Array:
    """Next token ids [B] from logits [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling"))
def _generate(
    config: ModelConfig,
    params: dict,
    tokens: Array,
    mask: Array,
    rng: Array,
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: Array,
    pad_id: Array,
) -> Array:
    model = Transformer(config)
    batch = tokens.shape[0]
    cache = KVCache.empty(config, batch, tokens.shape[1] + max_new_tokens)
    logits, cache = model.apply({"params": params}, tokens, cache, mask, method=Transformer.decode)
    out = jnp.full((batch, max_new_tokens), pad_id)
    state = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros(batch, bool), rng)

    def unfinished(state: tuple) -> Array:
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~done.all()

    def step_fn(state: tuple) -> tuple:
        step, last_logits, cache, out, done, rng = state
        rng, key = jax.random.split(rng)
        token = jnp.where(done, pad_id, choose(last_logits, sampling, key))
        out = out.at[:, step].set(token)
        # Finished rows keep stepping in lockstep, as padding nothing attends to.
        logits, cache = model.apply(
            {"params": params}, token[:, None], cache, ~done[:, None], method=Transformer.decode
        )
        done = done | (token == eos_id)
        return step + 1, logits[:, -1], cache, out, done, rng

    return jax.lax.while_loop(unfinished, step_fn, state)[3]


def generate(
    config: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    pad_id: int = 0,
    rng: Array | None = None,
    width: int = 0,
) -> np.ndarray:
    """New tokens [B, max_new_tokens] continuing each prompt (prompts not included).

    A row stops after it emits ``eos_id`` (which is kept); its remaining slots hold
    ``pad_id``. ``rng`` is needed only when sampling (temperature > 0). Prompts are padded to
    at least ``width`` (one a caller has already compiled the loop for).
    """
    if sampling.temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > config.max_len:
        raise ValueError(
            f"prompt of {longest} + {max_new_tokens} new tokens exceeds max_len {config.max_len}"
        )
    width = max(width, padded_width(longest, config.max_len - max_new_tokens))
    tokens, mask = left_pad(prompts, pad_id, width)
    key = jax.random.key(0) if rng is None else rng
    # Token ids are never negative, so -1 stands for "no EOS"; both ids are traced values,
    # so changing them does not recompile the loop.
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    out = _generate(
        config, params, tokens, mask, key, max_new_tokens, sampling, eos, jnp.int32(pad_id)
    )
    return np.asarray(out)
