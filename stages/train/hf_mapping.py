"""Pure name and layout mapping between our parameter tree and Hugging Face state dicts.

Both directions work on numpy arrays one tensor at a time, so the convert stage can stream
a checkpoint through them. Names are the published checkpoint names (GPT-NeoX's output
matrix is ``embed_out.weight``; transformers 5 calls it ``lm_head.weight`` in a live model
and renames on load, so ``params_from_hf`` accepts either). Torch Linear weights are
[out, in]; ours are [in..., out...].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.train.model_config import ModelConfig
from stages.train.params import LeafPath, Params, leaf_at, set_leaf

NEOX_OUTPUT_ALIASES = {"embed_out.weight": "lm_head.weight"}


@dataclass(frozen=True)
class TensorRule:
    """One Hugging Face tensor made from one or more of our leaves (NeoX fuses q, k, v)."""

    hf_name: str
    """Hugging Face name; ``{i}`` stands for the layer index in per-layer tensors."""
    ours: tuple[LeafPath, ...]
    """Our leaves, as paths into the parameter tree (stacked over layers for ``{i}`` names)."""
    to_hf: Callable[..., np.ndarray]
    """Our leaves (one layer's slice for per-layer tensors) -> the Hugging Face tensor."""
    from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    """The Hugging Face tensor -> our leaves, in the order of ``ours``."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _copy(hf_name: str, ours: LeafPath) -> TensorRule:
    return TensorRule(hf_name, (ours,), lambda a: a, lambda a: (a,))


def _linear(
    hf_name: str, ours: LeafPath, shape_in: tuple[int, ...], shape_out: tuple[int, ...]
) -> TensorRule:
    n_in, n_out = math.prod(shape_in), math.prod(shape_out)
    return TensorRule(
        hf_name,
        (ours,),
        lambda k: k.reshape(n_in, n_out).T,
        lambda w: (w.T.reshape(*shape_in, *shape_out),),
    )


def _norm(hf_prefix: str, ours: LeafPath) -> list[TensorRule]:
    return [
        _copy(f"{hf_prefix}.weight", (*ours, "scale")),
        _copy(f"{hf_prefix}.bias", (*ours, "bias")),
    ]


def _mlp(config: ModelConfig, hf_prefix: str, fc_in: str, fc_out: str) -> list[TensorRule]:
    d, f = config.d_model, config.d_ff
    mlp = ("layers", "mlp")
    return [
        _linear(f"{hf_prefix}.{fc_in}.weight", (*mlp, "fc_in", "kernel"), (d,), (f,)),
        _copy(f"{hf_prefix}.{fc_in}.bias", (*mlp, "fc_in", "bias")),
        _linear(f"{hf_prefix}.{fc_out}.weight", (*mlp, "fc_out", "kernel"), (f,), (d,)),
        _copy(f"{hf_prefix}.{fc_out}.bias", (*mlp, "fc_out", "bias")),
    ]


def _gptj_rules(config: ModelConfig) -> list[TensorRule]:
    d, heads = config.d_model, (config.n_heads, config.head_dim)
    layer = "transformer.h.{i}"
    attn = ("layers", "attn")
    return [
        _copy("transformer.wte.weight", ("embed", "embedding")),
        *_norm(f"{layer}.ln_1", ("layers", "ln_1")),
        *(
            _linear(f"{layer}.attn.{n}_proj.weight", (*attn, n, "kernel"), (d,), heads)
            for n in ("q", "k", "v")
        ),
        _linear(f"{layer}.attn.out_proj.weight", (*attn, "o", "kernel"), heads, (d,)),
        *_mlp(config, f"{layer}.mlp", "fc_in", "fc_out"),
        *_norm("transformer.ln_f", ("ln_f",)),
        _linear("lm_head.weight", ("lm_head", "kernel"), (d,), (config.vocab_size,)),
        _copy("lm_head.bias", ("lm_head", "bias")),
    ]


def _fused_qkv(hf_name: str, suffix: str, lead: tuple[int, ...], config: ModelConfig) -> TensorRule:
    # NeoX views the fused output per head: row = head*3*Dh + {q,k,v}*Dh + d, i.e. the
    # output axes are (heads, 3, head_dim); `lead` is the input axis of a kernel (none for bias).
    h, dh = config.n_heads, config.head_dim
    paths = tuple(("layers", "attn", n, suffix) for n in ("q", "k", "v"))
    n_lead = len(lead)

    def to_hf(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        fused = np.stack([q, k, v], axis=n_lead + 1).reshape(*lead, 3 * h * dh)
        return fused.T if lead else fused

    def from_hf(w: np.ndarray) -> tuple[np.ndarray, ...]:
        fused = (w.T if lead else w).reshape(*lead, h, 3, dh)
        return tuple(np.take(fused, j, axis=n_lead + 1) for j in range(3))

    return TensorRule(hf_name, paths, to_hf, from_hf)


def _neox_rules(config: ModelConfig) -> list[TensorRule]:
    d, heads = config.d_model, (config.n_heads, config.head_dim)
    layer = "gpt_neox.layers.{i}"
    attn = ("layers", "attn")
    rules = [
        _copy("gpt_neox.embed_in.weight", ("embed", "embedding")),
        *_norm(f"{layer}.input_layernorm", ("layers", "ln_1")),
        *_norm(f"{layer}.post_attention_layernorm", ("layers", "ln_2")),
        _fused_qkv(f"{layer}.attention.query_key_value.weight", "kernel", (d,), config),
        _linear(f"{layer}.attention.dense.weight", (*attn, "o", "kernel"), heads, (d,)),
        *_mlp(config, f"{layer}.mlp", "dense_h_to_4h", "dense_4h_to_h"),
        *_norm("gpt_neox.final_layer_norm", ("ln_f",)),
        _linear("embed_out.weight", ("lm_head", "kernel"), (d,), (config.vocab_size,)),
    ]
    if config.attn_bias:
        rules += [
            _fused_qkv(f"{layer}.attention.query_key_value.bias", "bias", (), config),
            _copy(f"{layer}.attention.dense.bias", (*attn, "o", "bias")),
        ]
    return rules


def tensor_rules(config: ModelConfig) -> list[TensorRule]:
    """Every Hugging Face tensor of this config and how it relates to our leaves."""
    return _gptj_rules(config) if config.architecture == "gptj" else _neox_rules(config)


def iter_hf_tensors(config: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor) of the Hugging Face state dict, one tensor at a time."""
    for rule in tensor_rules(config):
        leaves = [leaf_at(params, path) for path in rule.ours]
        if not rule.per_layer:
            yield rule.hf_name, rule.to_hf(*(np.asarray(a) for a in leaves))
            continue
        for i in range(config.n_layers):
            yield rule.hf_name.format(i=i), rule.to_hf(*(np.asarray(a[i]) for a in leaves))


def params_to_hf(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """The whole Hugging Face state dict of an (unboxed) parameter tree."""
    return dict(iter_hf_tensors(config, params))


def params_from_hf(config: ModelConfig, state_dict: Mapping[str, Any]) -> Params:
    """Our parameter tree (numpy, dtypes kept) from a Hugging Face state dict."""
    params: Params = {}
    for rule in tensor_rules(config):
        if not rule.per_layer:
            for path, leaf in zip(
                rule.ours, rule.from_hf(_read(state_dict, rule.hf_name)), strict=True
            ):
                set_leaf(params, path, leaf)
            continue
        layers = [
            rule.from_hf(_read(state_dict, rule.hf_name.format(i=i)))
            for i in range(config.n_layers)
        ]
        for j, path in enumerate(rule.ours):
            set_leaf(params, path, np.stack([leaves[j] for leaves in layers]))
    return params


def _read(state_dict: Mapping[str, Any], name: str) -> np.ndarray:
    if name not in state_dict and name in NEOX_OUTPUT_ALIASES:
        name = NEOX_OUTPUT_ALIASES[name]
    return np.asarray(state_dict[name])


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` fields that describe this model to transformers (no token ids)."""
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": False}
    if config.architecture == "gptj":
        return {
            **common,
            "model_type": "gptj",
            "architectures": ["GPTJForCausalLM"],
            "n_embd": config.d_model,
            "n_layer": config.n_layers,
            "n_head": config.n_heads,
            "n_inner": config.d_ff,
            "rotary_dim": config.rotary_dim,
            "n_positions": config.max_len,
            "activation_function": config.activation,
            "layer_norm_epsilon": config.layer_norm_eps,
        }
    return {
        **common,
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "rotary_pct": _rotary_pct(config),
        "rotary_emb_base": config.rotary_base,
        "max_position_embeddings": config.max_len,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.parallel_residual,
        "attention_bias": config.attn_bias,
    }


def _rotary_pct(config: ModelConfig) -> float:
    # transformers computes int(head_dim * rotary_pct); nudge up where float rounding would
    # truncate to one dim less.
    pct = config.rotary_dim / config.head_dim
    return pct if int(config.head_dim * pct) == config.rotary_dim else math.nextafter(pct, 1.0)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Our config from a transformers ``config.json`` of GPT-J or GPT-NeoX (or Pythia)."""
    if hf["model_type"] == "gptj":
        if not hf.get("rotary_dim"):
            # transformers then rotates whole heads with frequencies of d_model, not head_dim.
            raise ValueError("GPT-J configs without rotary_dim are not supported")
        fields: dict[str, Any] = dict(
            architecture="gptj",
            vocab_size=hf["vocab_size"],
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            rotary_dim=hf["rotary_dim"],
            rotary_style="interleaved",
            shared_norm=True,
            attn_bias=False,
            activation=hf.get("activation_function", "gelu_new"),
            lm_head_bias=True,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            max_len=hf.get("n_positions", 2048),
        )
    elif hf["model_type"] == "gpt_neox":
        rope = hf.get("rope_parameters") or {}
        pct = hf.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        fields = dict(
            architecture="neox",
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"],
            rotary_dim=int(head_dim * pct),
            rotary_style="half",
            rotary_base=hf.get("rotary_emb_base", rope.get("rope_theta", 10000.0)),
            parallel_residual=hf.get("use_parallel_residual", True),
            shared_norm=False,
            attn_bias=hf.get("attention_bias", True),
            activation=hf.get("hidden_act", "gelu"),
            lm_head_bias=False,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            max_len=hf.get("max_position_embeddings", 2048),
        )
    else:
        raise ValueError(f"unsupported model_type {hf['model_type']!r}: expected gptj or gpt_neox")
    return ModelConfig.model_validate({**fields, **overrides})


def to_transformers(config: ModelConfig, params: Params, **hf_overrides: Any) -> Any:
    """A float32 transformers model with eager attention holding ``params`` (for checks and
    evaluation against the reference implementation); ``hf_overrides`` go to its config."""
    import torch
    import transformers

    fields = {**hf_config(config), **hf_overrides}
    hf_conf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_conf, attn_implementation="eager", dtype=torch.float32
    )
    live_names = set(model.state_dict())
    state = {
        name if name in live_names else NEOX_OUTPUT_ALIASES[name]: torch.tensor(
            np.asarray(tensor, dtype=np.float32)
        )
        for name, tensor in iter_hf_tensors(config, params)
    }
    model.load_state_dict(state, strict=True)
    return model.eval()
