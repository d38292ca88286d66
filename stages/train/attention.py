"""The attention kernels the model runs, and the choice between them (``ModelConfig.attention``).

Only a forward with no padding mask and no KV cache (training, unpadded scoring) may use a
fused kernel: generation and the evaluator pad on the left, and cuDNN expresses padding only
as right-padded sequence lengths, so every padded or cached call takes the XLA path with its
explicit ``allowed`` mask. Choices:

- ``xla``: einsum, float32 scores and softmax, any mask. Runs everywhere; materialises the
  [batch, heads, seq, seq] scores, which is what the fused kernels avoid. On CPU it is
  faster than ``jax.nn.dot_product_attention(implementation="xla", is_causal=True)``:
  forward and backward of the 100m config's attention (12 heads of 64, float32, jitted,
  median of 7 on 2 cores) took 60 against 103 ms at 2 x 512 tokens and 1063 against
  1118 ms at 1 x 2048, so CPU keeps it.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention`` on NVIDIA GPUs;
  bfloat16/float16 inputs only, head_dim limited (below).
- ``splash``: the Pallas TPU splash-attention kernel (block-sparse flash attention that
  skips the masked-out upper triangle), sharded by ``jax.shard_map`` so each device runs it
  on its own batch rows and heads. Its matmuls take no precision argument, so
  ``matmul_precision`` does not reach them. Off TPU it runs in Pallas interpret mode (slow,
  exact: what the CPU tests check).
- ``auto``: cuDNN on a GPU where it fits, splash on TPU v4 and later, else XLA; a fallback
  is logged once per config.

Head sizes and sequence lengths each implementation accepts:

=========  ============================================  ====================  ============
kernel     head_dim                                      sequence length       dtype
=========  ============================================  ====================  ============
xla        any                                           any                   any
cudnn      multiple of 8 and <= 256 on sm90+ (Hopper,    any                   bf16, fp16
           Blackwell); multiple of 8 and <= 128 before
splash     any: a block spans the whole head dim, which  multiple of 128       f32, bf16
           Pallas TPU allows (multiples of 128 fill the  (else the XLA path)
           lanes; only interpret mode checked here)
=========  ============================================  ====================  ============

The cuDNN limits are jax's own check (``check_is_flash_attention`` in
``jax/_src/cudnn/fused_attention_stablehlo.py``, jax 0.10.2): "The head dim must be <=
{H_max} and a multiple of 8" with ``H_max = 256 if is_hopper_or_later else 128`` for
bf16/fp16. The splash limit is its kernel's: ``block_kv_compute`` must be a multiple of 128
lanes and every block must divide the sequence.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)

from stages.train.model_config import ModelConfig

Array = jax.Array
Kernel = Literal["xla", "cudnn", "splash"]

logger = logging.getLogger(__name__)

HEADS_LAYOUT = ("batch", "length", "heads", "head_dim")
"""Logical axes of q, k, v and the attention output."""
SPLASH_LANES = 128
"""Splash blocks are whole multiples of the TPU's 128 lanes."""
SPLASH_BLOCK = 512
"""Splash block size for long sequences (what MaxText uses at 2048 tokens)."""
OLD_TPUS = ("TPU v2", "TPU v3")
"""Mosaic does not compile splash's bfloat16 matmuls on v3; v2, older still, is assumed the
same (not checked)."""


def cudnn_head_dim_limit(compute_capability: tuple[int, int]) -> int:
    """Largest head_dim cuDNN flash attention takes in bf16/fp16 on this GPU generation."""
    return 256 if compute_capability >= (9, 0) else 128


def _cudnn_problem(config: ModelConfig, compute_capability: str | None) -> str | None:
    """Why cuDNN flash attention cannot run this config on a GPU of this capability, or None."""
    if config.dtype != "bfloat16":
        return f"it needs bfloat16 inputs and ModelConfig.dtype is {config.dtype!r}"
    try:
        major, minor = (int(part) for part in str(compute_capability).split("."))
    except ValueError:
        return f"the GPU is not an NVIDIA CUDA device (compute capability {compute_capability!r})"
    limit = cudnn_head_dim_limit((major, minor))
    head_dim = config.head_dim
    if head_dim > limit or head_dim % 8:
        return (
            f"head_dim {head_dim} must be a multiple of 8 and at most {limit} "
            f"on compute capability {major}.{minor}"
        )
    return None


def resolve_attention(
    config: ModelConfig, backend: str, device_kind: str, compute_capability: str | None = None
) -> Kernel:
    """The kernel dense forwards of ``config`` use on this platform.

    ``backend`` is ``jax.default_backend()``, ``device_kind`` and ``compute_capability``
    (CUDA's "major.minor", GPUs only) those of its first device. An explicit choice is
    honoured or, where it cannot run, refused; "auto" falls back to XLA with a log line."""
    choice = config.attention
    if choice in ("xla", "splash"):
        return choice
    if choice == "cudnn":
        problem = (
            f"the backend is {backend}, not gpu"
            if backend != "gpu"
            else _cudnn_problem(config, compute_capability)
        )
        if problem:
            raise ValueError(f"ModelConfig.attention='cudnn' cannot run: {problem}")
        return "cudnn"
    if backend == "gpu":
        problem = _cudnn_problem(config, compute_capability)
        if problem is None:
            return "cudnn"
        logger.info("attention auto: XLA, not cuDNN, because %s", problem)
        return "xla"
    if backend == "tpu":
        if device_kind.startswith(OLD_TPUS):
            logger.info(
                "attention auto: XLA, not splash: Mosaic does not compile its bf16 matmuls on %s",
                device_kind,
            )
            return "xla"
        return "splash"
    return "xla"


@functools.cache
def kernel_for(config: ModelConfig) -> Kernel:
    """``resolve_attention`` on this process's default devices, once per config."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return resolve_attention(config, jax.default_backend(), device.device_kind, capability)


def attend_heads(
    q: Array, k: Array, v: Array, allowed: Array, config: ModelConfig, dense: bool
) -> Array:
    """Attention output [batch, seq, heads, head_dim] in ``config.dtype`` of rotated q and k
    and v [batch, seq|slots, heads, head_dim].

    ``allowed`` [batch, seq, slots] is the XLA path's mask; ``dense`` (no padding mask, no
    cache, so ``allowed`` is plain causal) lets the configured fused kernel replace it."""
    kernel = kernel_for(config) if dense else "xla"
    if kernel == "splash" and q.shape[1] % SPLASH_LANES:
        # An odd-length unpadded scoring call, or init's one-token trace: nothing to report.
        logger.debug(
            "attention: XLA for sequence length %d (splash needs a multiple of 128)", q.shape[1]
        )
        kernel = "xla"
    if kernel == "cudnn":
        return cudnn_attention(q, k, v, config)
    if kernel == "splash":
        return splash_attention(q, k, v, config)
    return xla_attention(q, k, v, allowed, config)


def xla_attention(q: Array, k: Array, v: Array, allowed: Array, config: ModelConfig) -> Array:
    """Masked softmax attention in plain XLA: scores and softmax in float32, as Hugging Face
    computes them."""
    precision = config.matmul_precision
    scores = jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=precision
    )
    # A finite fill keeps rows with no allowed key (padding queries) NaN-free.
    scores = jnp.where(allowed[:, None], scores / math.sqrt(config.head_dim), -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(config.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(config.dtype), precision=precision)


def cudnn_attention(q: Array, k: Array, v: Array, config: ModelConfig) -> Array:
    """Causal cuDNN flash attention; q, k, v cast to ``config.dtype`` (bf16: cuDNN's own
    check refuses float32)."""
    dtype = jnp.dtype(config.dtype)
    return jax.nn.dot_product_attention(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        scale=1 / math.sqrt(config.head_dim),
        is_causal=True,
        implementation="cudnn",
    )


def splash_block_sizes(seq: int) -> splash_kernel.BlockSizes:
    """Forward and backward tiles for ``seq`` tokens (a multiple of 128): 512, or the largest
    multiple of 128 lanes that divides ``seq`` when 512 does not."""
    block = next(b for b in range(min(SPLASH_BLOCK, seq), 0, -SPLASH_LANES) if seq % b == 0)
    return splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )


def _splash_local(q: Array, k: Array, v: Array) -> Array:
    """Causal splash attention of one device's rows and heads, [batch, seq, heads, head_dim]
    (q already scaled)."""
    _, seq, heads, _ = q.shape
    # Built per call from the local head count: the kernel's mask tables then match this
    # shard without being sharded themselves.
    kernel = splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq))] * heads),
        block_sizes=splash_block_sizes(seq),
        head_shards=1,
        q_seq_shards=1,
        interpret=jax.default_backend() != "tpu",
    )
    # The kernel takes one example [heads, seq, head_dim]; swapping axes 1 and 2 is its own
    # inverse.
    swap = (0, 2, 1, 3)
    return jax.vmap(kernel)(*(x.transpose(swap) for x in (q, k, v))).transpose(swap)


def splash_attention(q: Array, k: Array, v: Array, config: ModelConfig) -> Array:
    """Causal splash attention, under ``jax.shard_map`` over the mesh in context so every
    device keeps its batch rows and heads as the logical rules place them."""
    dtype = jnp.dtype(config.dtype)
    # Splash does not scale the scores; scaling q in float32 first rounds once.
    q = (q.astype(jnp.float32) / math.sqrt(config.head_dim)).astype(dtype)
    k, v = k.astype(dtype), v.astype(dtype)
    if jax.sharding.get_abstract_mesh().empty:
        return _splash_local(q, k, v)
    spec = nn.logical_to_mesh_axes(HEADS_LAYOUT)
    # The Pallas call does not track which mesh axes its output varies over.
    sharded = jax.shard_map(_splash_local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    return sharded(q, k, v)
