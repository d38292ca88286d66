"""The models evaluate scores and ``meshline sample`` continues: the trained checkpoint, the
model its training run started from, and any model directory a user names.

Every train output is read through ``stages.train.output.load_params`` (the model config and
the params, their shapes checked against each other first); Hugging Face exports through
``stages.convert.import_hf``.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from pipeline import storage
from pipeline.stage import recorded_upstream_uri
from stages.convert.hf_dir import CONFIG, INDEX, SINGLE, import_hf
from stages.convert.stage import MODEL_UNIT
from stages.evaluate.lm import hf_dir_tokenizer
from stages.tokenize import Tokenizer, load_tokenizer
from stages.train.config import TrainConfig
from stages.train.model import init_params
from stages.train.model_config import ModelConfig
from stages.train.output import (
    CHECKPOINTS,
    MODEL_CONFIG,
    is_train_output,
    load_params,
    read_model_config,
    train_output_of,
)
from stages.train.params import Params


class ModelPathError(ValueError):
    """A model path that cannot be loaded; the message says why."""


def initial_params(train_output: str, train_config: TrainConfig) -> tuple[ModelConfig, Params]:
    """What the training run started from: the params ``Trainer.initial_state`` makes from the
    run's seed, or the ``init_from`` checkpoint's of a fine-tuning run."""
    config = read_model_config(train_output)
    if train_config.init_from:
        return config, load_params(train_output_of(train_config.init_from))[1]
    params = nn.unbox(init_params(config, jax.random.key(train_config.seed)))
    return config, jax.device_get(params)


def is_hf_dir(path: str) -> bool:
    """Whether ``path`` is a Hugging Face export (its config and safetensors weights)."""
    has_weights = any(storage.exists(storage.join(path, name)) for name in (INDEX, SINGLE))
    return storage.exists(storage.join(path, CONFIG)) and has_weights


def load_model(
    path: str, tokenizer_dir: str | None, step: int | None
) -> tuple[ModelConfig, Params, Tokenizer]:
    """Config, params and tokenizer of a train output (checkpoint ``step``, the latest by
    default; the tokenizer of ``tokenizer_dir`` or of the tokenize output its run read), a
    convert output or a Hugging Face export (its own tokenizer unless ``tokenizer_dir``)."""
    if is_hf_dir(storage.join(path, MODEL_UNIT)):
        path = storage.join(path, MODEL_UNIT)
    if is_hf_dir(path):
        params, config = import_hf(path)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else hf_dir_tokenizer(path)
        return config, params, tokenizer
    if is_train_output(path):
        config, params = load_params(path, step)
        tokenizer_dir = tokenizer_dir or recorded_upstream_uri(path, "tokenize")
        if tokenizer_dir is None:
            raise ModelPathError(f"{path}: no tokenize input recorded for it; pass --tokenizer DIR")
        return config, params, load_tokenizer(tokenizer_dir)
    raise ModelPathError(
        f"{path}: neither a train stage output ({MODEL_CONFIG} and {CHECKPOINTS}/) nor a "
        f"Hugging Face export ({CONFIG} and {SINGLE} or {INDEX})"
    )
