"""GPT-J and GPT-NeoX in Flax linen: the one model that train, convert and evaluate share.

Why linen rather than NNX: parameters are a plain nested dict of arrays, which is what the
Hugging Face name mapping, Orbax checkpoints and optax work on without adapters, and
``nn.scan`` / ``nn.remat`` / ``nn.with_logical_partitioning`` are the mature, MaxText-proven
way to stack layers and attach logical sharding names to them.

Parameter tree (``L`` layers stacked on a leading axis by the layer scan)::

    embed/embedding                 [V, D]          (vocab, embed)
    layers/ln_1/{scale,bias}        [L, D]          (layers, embed)      ln_2 too unless shared
    layers/attn/{q,k,v}/kernel      [L, D, H, Dh]   (layers, embed, heads, head_dim)
    layers/attn/{q,k,v}/bias        [L, H, Dh]      only with attn_bias
    layers/attn/o/kernel            [L, H, Dh, D]   (layers, heads, head_dim, embed)
    layers/attn/o/bias              [L, D]          only with attn_bias
    layers/mlp/fc_in/{kernel,bias}  [L, D, F], [L, F]
    layers/mlp/fc_out/{kernel,bias} [L, F, D], [L, D]
    ln_f/{scale,bias}               [D]
    lm_head/kernel, lm_head/bias    [D, V], [V]     bias only with lm_head_bias

Layer code names logical axes only; ``sharding.LOGICAL_RULES`` maps them to mesh axes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from stages.train.attention import attend_heads
from stages.train.model_config import ModelConfig

Array = jax.Array
LayerKV = tuple[Array, Array] | None
"""One layer's cached keys and values [batch, slots, heads, head_dim], or None without a
cache."""

REMAT_POLICIES: dict[str, Callable[..., bool]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    # gelu_fast is the same tanh formula with sqrt(2/pi) rounded to 0.7978845608.
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
}


@struct.dataclass
class KVCache:
    """Keys and values of every layer for ``length`` slots, filled left to right."""

    k: Array
    """[layers, batch, length, heads, head_dim]"""
    v: Array
    """[layers, batch, length, heads, head_dim]"""
    valid: Array
    """[batch, length] bool: the slot holds a real (not padding) token."""
    index: Array
    """int32 scalar: slots written so far; the next tokens go to slot ``index``."""

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (config.n_layers, batch, length, config.n_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, config.dtype),
            v=jnp.zeros(shape, config.dtype),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )


@struct.dataclass
class Attend:
    """Where the tokens of one forward pass sit and which key slots each may attend to; the
    same in every layer."""

    positions: Array
    """[batch, tokens] position of each token (its rotary angle)."""
    allowed: Array
    """[batch, tokens, slots] bool: the token may attend to the key slot."""
    slot: Array
    """int32 scalar: the cache slot of the first token (0 without a cache)."""
    dense: bool = struct.field(pytree_node=False)
    """No padding mask and no cache: ``allowed`` is plain causal, so a fused kernel that
    knows only causal masks may replace it (``attention.attend_heads``)."""


def _init(names: tuple[str, ...], init: Callable[..., Array]) -> Callable[..., Array]:
    return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str, ...]) -> Array:
    """Shard an activation by logical names (no-op without a mesh and rules in context)."""
    return nn.with_logical_constraint(x, names)


def rotary(x: Array, positions: Array, config: ModelConfig) -> Array:
    """Rotate the first ``rotary_dim`` dims of each head of x [B, S, H, Dh] by position."""
    r = config.rotary_dim
    inv_freq = 1.0 / (config.rotary_base ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, S, 1, r/2]
    rot, rest = x[..., :r].astype(jnp.float32), x[..., r:]
    if config.rotary_style == "interleaved":
        sin, cos = (jnp.repeat(f(angles), 2, axis=-1) for f in (jnp.sin, jnp.cos))
        turned = jnp.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    else:
        sin, cos = (jnp.concatenate([f(angles)] * 2, axis=-1) for f in (jnp.sin, jnp.cos))
        turned = jnp.concatenate([-rot[..., r // 2 :], rot[..., : r // 2]], axis=-1)
    return jnp.concatenate([(rot * cos + turned * sin).astype(x.dtype), rest], axis=-1)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance in float32, as torch computes it: the fast E[x^2]-E[x]^2 form
    # loses digits that the parity tests see.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=config.param_dtype,
        use_fast_variance=False,
        scale_init=_init(("embed",), nn.initializers.ones),
        bias_init=_init(("embed",), nn.initializers.zeros),
        name=name,
    )


class Linear(nn.Module):
    """``x @ kernel + bias`` contracting the last ``n_in`` axes of x; kernel axes are named.

    flax's DenseGeneral initialises multi-axis kernels flat and reshapes them, which breaks
    its own logical sharding constraint under a mesh; this keeps the kernel's true shape.
    """

    features: tuple[int, ...]
    names: tuple[str, ...]
    """Logical names of the kernel's axes: the n_in input axes, then the feature axes."""
    use_bias: bool
    config: ModelConfig
    n_in: int = 1
    init_scale: float = 1.0
    """Shrinks the init; residual output projections use 2/n_layers (mesh-transformer-jax)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_axes = tuple(range(self.n_in))
        out_axes = tuple(range(self.n_in, self.n_in + len(self.features)))
        # Fan-in scaled truncated normal, like the Haiku Linear default that GPT-J used.
        init = nn.initializers.variance_scaling(
            self.init_scale**2, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes
        )
        shape = (*x.shape[x.ndim - self.n_in :], *self.features)
        kernel = self.param("kernel", _init(self.names, init), shape, self.config.param_dtype)
        dtype = self.config.dtype
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), in_axes)
        y = jax.lax.dot_general(
            x.astype(dtype),
            kernel.astype(dtype),
            (contract, ((), ())),
            precision=self.config.matmul_precision,
        )
        if self.use_bias:
            bias_init = _init(self.names[self.n_in :], nn.initializers.zeros)
            bias = self.param("bias", bias_init, self.features, self.config.param_dtype)
            y = y + bias.astype(dtype)
        return y


class Attention(nn.Module):
    """Causal multi-head attention with rotary q/k; the kernel is ``config.attention``'s
    (``stages.train.attention``)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, attend: Attend, kv: LayerKV) -> tuple[Array, LayerKV]:
        cfg = self.config
        heads = ("batch", "length", "heads", "head_dim")
        project = partial(
            Linear,
            features=(cfg.n_heads, cfg.head_dim),
            names=("embed", "heads", "head_dim"),
            use_bias=cfg.attn_bias,
            config=cfg,
        )
        q, k, v = (constrain(project(name=n)(x), heads) for n in ("q", "k", "v"))
        q, k = rotary(q, attend.positions, cfg), rotary(k, attend.positions, cfg)
        if kv is not None:
            at = (0, attend.slot, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), at)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), at)
            kv = (k, v)
        out = attend_heads(q, k, v, attend.allowed, cfg, dense=attend.dense)
        out = constrain(out, heads)
        out = Linear(
            features=(cfg.d_model,),
            names=("heads", "head_dim", "embed"),
            use_bias=cfg.attn_bias,
            config=cfg,
            n_in=2,
            init_scale=2 / cfg.n_layers,
            name="o",
        )(out)
        return out, kv


class Mlp(nn.Module):
    """fc_in -> gelu -> fc_out, both with biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        fc_in = Linear(
            features=(cfg.d_ff,), names=("embed", "mlp"), use_bias=True, config=cfg, name="fc_in"
        )
        h = ACTIVATIONS[cfg.activation](constrain(fc_in(x), ("batch", "length", "mlp")))
        fc_out = Linear(
            features=(cfg.d_model,),
            names=("mlp", "embed"),
            use_bias=True,
            config=cfg,
            init_scale=2 / cfg.n_layers,
            name="fc_out",
        )
        return fc_out(h)


class Block(nn.Module):
    """One transformer layer; the layer scan calls it as ``(carry, *xs) -> (carry, ys)``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, attend: Attend, kv: LayerKV) -> tuple[Array, LayerKV]:
        cfg = self.config
        h = layer_norm(cfg, "ln_1")(x).astype(cfg.dtype)
        attn, kv = Attention(cfg, name="attn")(h, attend, kv)
        mlp = Mlp(cfg, name="mlp")
        if not cfg.parallel_residual:
            x = x + attn
            x = x + mlp(layer_norm(cfg, "ln_2")(x).astype(cfg.dtype))
        elif cfg.shared_norm:
            x = x + attn + mlp(h)
        else:
            x = x + attn + mlp(layer_norm(cfg, "ln_2")(x).astype(cfg.dtype))
        return constrain(x, ("batch", "length", "embed")), kv


def stacked_blocks(config: ModelConfig) -> type[nn.Module]:
    """Block, rematerialised as configured, scanned over ``n_layers`` stacked parameters."""
    block: type[nn.Module] = Block
    if config.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0),
        length=config.n_layers,
        unroll=config.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Transformer(nn.Module):
    """The language model: ``apply(params, tokens)`` gives float32 logits [B, S, V]."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        # Holds the table only; _forward does the lookup (see there).
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            param_dtype=cfg.param_dtype,
            embedding_init=_init(("vocab", "embed"), nn.initializers.normal(0.02)),
        )
        self.layers = stacked_blocks(cfg)(cfg)
        self.ln_f = layer_norm(cfg, "ln_f")
        self.lm_head = Linear(
            features=(cfg.vocab_size,),
            names=("embed", "vocab"),
            use_bias=cfg.lm_head_bias,
            config=cfg,
        )

    def __call__(
        self, tokens: Array, mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        """Logits for every position of tokens [B, S].

        mask [B, S] marks real tokens (1) against padding (0); padded positions attend to
        nothing real and their logits are meaningless. positions default to the count of
        real tokens before each one, so a left-padded row scores as if unpadded.
        """
        return self.project(self._forward(tokens, mask, positions, None)[0])

    def decode(
        self,
        tokens: Array,
        cache: KVCache,
        mask: Array | None = None,
        positions: Array | None = None,
        project: bool = True,
    ) -> tuple[Array, KVCache]:
        """Logits for tokens [B, S] written to the cache after what it holds, and the new cache.

        With ``project=False``, the final hidden states [B, S, D] instead of logits, for
        callers that ``project`` only the positions they need."""
        hidden, kv, valid = self._forward(tokens, mask, positions, cache)
        index = cache.index + tokens.shape[1]
        out = self.project(hidden) if project else hidden
        return out, KVCache(k=kv[0], v=kv[1], valid=valid, index=index)

    def project(self, hidden: Array) -> Array:
        """Float32 logits [B, S, V] of final hidden states [B, S, D]."""
        return constrain(self.lm_head(hidden).astype(jnp.float32), ("batch", "length", "vocab"))

    def _forward(
        self, tokens: Array, mask: Array | None, positions: Array | None, cache: KVCache | None
    ) -> tuple[Array, tuple[Array, Array] | None, Array]:
        """Final hidden states, the updated keys/values (with a cache) and which key slots
        are real."""
        dense = mask is None and cache is None
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        if cache is None:
            slot, seen, key_valid = jnp.zeros((), jnp.int32), 0, mask
            kv = None
        else:
            slot, seen = cache.index, cache.valid.sum(-1, keepdims=True)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            kv = (cache.k, cache.v)
        if positions is None:
            positions = seen + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        query_slot = slot + jnp.arange(tokens.shape[1])
        causal = jnp.arange(key_valid.shape[1])[None, :] <= query_slot[:, None]
        allowed = key_valid[:, None, :] & causal[None]

        # The lookup reads whole rows: gather the table's fsdp shards first, as FSDP does for
        # every weight, so the partitioner never has to re-split an embed-sharded result.
        table = constrain(self.embed.embedding.astype(self.config.dtype), ("vocab", None))
        x = constrain(jnp.take(table, tokens, axis=0), ("batch", "length", "embed"))
        x, kv = self.layers(x, Attend(positions, allowed, slot, dense), kv)
        return self.ln_f(x).astype(self.config.dtype), kv, key_valid


# Both jitted (config is static and hashable): running the layer scan op by op costs seconds
# even for tiny models, and a module-level jit is compiled once per config and shape.
@partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng: Array) -> dict:
    """Freshly initialised parameters, boxed with their logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens)["params"]


@partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params: dict, tokens: Array, mask: Array | None = None) -> Array:
    """Float32 logits [B, S, V] of an unboxed parameter tree (see ``Transformer.__call__``)."""
    return Transformer(config).apply({"params": params}, tokens, mask)
