"""The typed model config shared by train, convert and evaluate, its presets and parameter count.

One config describes both families: GPT-J (one LayerNorm, parallel residual, interleaved
rotary, no attention biases, lm_head with bias) and GPT-NeoX / Pythia (two LayerNorms,
parallel or sequential residual, half rotary, attention biases, lm_head without bias).
The config is validated against what the named Hugging Face architecture can express, so
every valid config converts both ways without loss.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Shape and numerics of one GPT-J or GPT-NeoX model."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    architecture: Literal["gptj", "neox"]
    """Hugging Face family whose parameter names and layout the weights follow."""
    vocab_size: int = Field(gt=0)
    """Rows of the embedding and lm_head matrices (may exceed the tokenizer's vocabulary)."""
    d_model: int = Field(gt=0)
    """Width of the residual stream."""
    n_layers: int = Field(gt=0)
    """Number of transformer blocks."""
    n_heads: int = Field(gt=0)
    """Attention heads per block; ``d_model`` must be a multiple of it."""
    d_ff: int = Field(gt=0)
    """Hidden width of the MLP (4 * d_model in every preset)."""
    rotary_dim: int = Field(gt=0)
    """Leading dims of each head that rotary embeddings rotate (even, at most head_dim)."""
    rotary_style: Literal["interleaved", "half"]
    """Pairing of rotated dims: GPT-J's adjacent pairs or NeoX's first/second half."""
    rotary_base: float = Field(default=10000.0, gt=0)
    """Base of the rotary frequencies."""
    parallel_residual: bool = True
    """``x + attn(ln(x)) + mlp(ln(x))`` when true, else ``x += attn(ln1(x)); x += mlp(ln2(x))``."""
    shared_norm: bool
    """One LayerNorm feeds both attention and MLP (GPT-J); else two (NeoX)."""
    attn_bias: bool
    """Biases on the q/k/v and attention-output projections."""
    activation: Literal["gelu_new", "gelu", "gelu_fast"]
    """MLP activation: tanh-approximate gelu (gelu_new, gelu_fast) or exact erf gelu."""
    lm_head_bias: bool
    """Bias on the output projection to the vocabulary."""
    layer_norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of every LayerNorm."""
    max_len: int = Field(default=2048, gt=0)
    """Longest sequence the model is meant for (context length)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of matmuls and activations; norms, softmax and logits stay float32."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of parameters (float32 master weights for training)."""
    matmul_precision: Literal["default", "high", "highest"] = "default"
    """Precision of matmuls on accelerators: at "default" TPUs and recent GPUs round float32
    inputs to bfloat16 / TF32; "highest" matches a float32 CPU reference (evaluation)."""
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    """Rematerialisation of each block in the backward pass: none, everything recomputed,
    or all / batch-free matmul outputs saved (jax.checkpoint_policies)."""
    scan_unroll: int = Field(default=1, gt=0)
    """Layers per iteration of the layer scan: 1 compiles fastest, n_layers is straight-line."""
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    """Attention kernel of forwards without padding or KV cache (training, unpadded scoring):
    cuDNN flash attention (NVIDIA GPU, bfloat16), Pallas splash (TPU), XLA einsums, or auto:
    the platform's fused kernel where it fits, else XLA (``stages.train.attention``). Padded
    and cached forwards always use XLA. How the model is run, not what it is, so
    model_config.json leaves it out."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_pct(self) -> float:
        return self.rotary_dim / self.head_dim

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= {self.head_dim}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError(
                "attention='cudnn' needs dtype='bfloat16': cuDNN flash attention has no float32"
            )
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm needs parallel_residual")
        if self.architecture == "gptj":
            self._check_gptj()
        else:
            self._check_neox()
        return self

    def _check_gptj(self) -> None:
        expected = dict(
            shared_norm=True,
            parallel_residual=True,
            rotary_style="interleaved",
            attn_bias=False,
            lm_head_bias=True,
            rotary_base=10000.0,
        )
        wrong = {k: v for k, v in expected.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"Hugging Face GPT-J cannot express this config; it needs {wrong}")

    def _check_neox(self) -> None:
        expected = dict(shared_norm=False, rotary_style="half", lm_head_bias=False)
        wrong = {k: v for k, v in expected.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"Hugging Face GPT-NeoX cannot express this config; it needs {wrong}")


def gptj(**fields: object) -> ModelConfig:
    """A GPT-J config: the family's fixed choices plus the given shape fields."""
    base: dict[str, object] = dict(
        architecture="gptj",
        rotary_style="interleaved",
        parallel_residual=True,
        shared_norm=True,
        attn_bias=False,
        activation="gelu_new",
        lm_head_bias=True,
    )
    return ModelConfig.model_validate({**base, **fields})


def neox(d_model: int, n_heads: int, rotary_pct: float = 0.25, **fields: object) -> ModelConfig:
    """A GPT-NeoX / Pythia config; ``rotary_pct`` gives rotary_dim unless that is set."""
    base: dict[str, object] = dict(
        architecture="neox",
        d_model=d_model,
        n_heads=n_heads,
        rotary_style="half",
        rotary_dim=int(d_model // n_heads * rotary_pct),
        parallel_residual=True,
        shared_norm=False,
        attn_bias=True,
        activation="gelu",
        lm_head_bias=False,
        d_ff=4 * d_model,
    )
    return ModelConfig.model_validate({**base, **fields})


def _pythia(n_layers: int, d_model: int, n_heads: int, vocab_size: int = 50304) -> ModelConfig:
    return neox(n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab_size=vocab_size)


PRESETS: dict[str, ModelConfig] = {
    # mesh-transformer-jax configs/6B_roto_256.json
    "gptj-6b": gptj(
        vocab_size=50400, d_model=4096, n_layers=28, n_heads=16, d_ff=16384, rotary_dim=64
    ),
    "gptj-tiny": gptj(
        vocab_size=1024, d_model=128, n_layers=4, n_heads=4, d_ff=512, rotary_dim=16, max_len=512
    ),
    "neox-20b": neox(
        vocab_size=50432, d_model=6144, n_layers=44, n_heads=64, activation="gelu_fast"
    ),
    "pythia-70m": _pythia(6, 512, 8),
    "pythia-160m": _pythia(12, 768, 12),
    "pythia-410m": _pythia(24, 1024, 16),
    "pythia-1b": _pythia(16, 2048, 8),
    "pythia-1.4b": _pythia(24, 2048, 16),
    "pythia-2.8b": _pythia(32, 2560, 32),
    "pythia-6.9b": _pythia(32, 4096, 32, vocab_size=50432),
    "pythia-12b": _pythia(36, 5120, 40, vocab_size=50688),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """The named preset with some fields replaced (e.g. ``dtype="bfloat16"``), revalidated."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig.model_validate({**PRESETS[name].model_dump(), **overrides})


def param_count(config: ModelConfig) -> int:
    """Number of parameters as Hugging Face counts them (untied embedding and lm_head)."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    norms = (1 if config.shared_norm else 2) * 2 * d
    attention = 4 * d * d + (4 * d if config.attn_bias else 0)
    mlp = d * f + f + f * d + d
    lm_head = d * v + (v if config.lm_head_bias else 0)
    return v * d + config.n_layers * (norms + attention + mlp) + 2 * d + lm_head
