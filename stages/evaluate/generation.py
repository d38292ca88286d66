"""Greedy and nucleus continuations of prompts, as the GPT-J release showed its model: what
``meshline sample`` prints and the evaluate stage's ``samples`` unit holds.

The ``samples`` unit is ``samples.txt``: each prompt and its two continuations side by side
(``columns.side_by_side``), also logged to MLflow as an artifact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from pipeline import storage
from pipeline.stage import StageContext
from stages.evaluate.columns import TOP_P, side_by_side
from stages.evaluate.config import SamplesSpec
from stages.evaluate.report import log_bytes
from stages.tokenize import Tokenizer
from stages.train.generate import GREEDY, Sampling, generate
from stages.train.model_config import ModelConfig
from stages.train.params import Params

SAMPLES_UNIT = "samples"
SAMPLES_FILE = "samples.txt"


def continuations(
    config: ModelConfig,
    params: Params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int,
) -> list[tuple[str, str]]:
    """(greedy, nucleus) continuation of each prompt, cut at the first EOS."""
    ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    nucleus = Sampling(temperature=1.0, top_p=TOP_P)
    eos = tokenizer.eos_id
    greedy = generate(config, params, ids, max_new_tokens, GREEDY, eos_id=eos, pad_id=eos)
    sampled = generate(
        config, params, ids, max_new_tokens, nucleus, eos, eos, rng=jax.random.key(seed)
    )
    return [
        (_decode(tokenizer, g), _decode(tokenizer, s)) for g, s in zip(greedy, sampled, strict=True)
    ]


def _decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    tokens = list(ids)
    if tokenizer.eos_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens)


def write_samples(
    ctx: StageContext,
    spec: SamplesSpec,
    model: Callable[[], tuple[ModelConfig, Params]],
    tokenizer: Tokenizer,
) -> None:
    """Greedy and nucleus continuations of the prompts by ``model()`` (loaded only if the
    unit is not committed yet): a unit and an MLflow artifact."""
    if not ctx.ledger.is_committed(SAMPLES_UNIT):
        config, params = model()
        pairs = continuations(
            config, params, tokenizer, spec.prompts, spec.max_new_tokens, spec.seed
        )
        text = "\n\n".join(
            side_by_side(prompt, greedy, nucleus)
            for prompt, (greedy, nucleus) in zip(spec.prompts, pairs, strict=True)
        )
        ctx.ledger.commit_file(SAMPLES_UNIT, SAMPLES_FILE, text.encode() + b"\n")
    data = storage.read_bytes(storage.join(ctx.output, SAMPLES_FILE))
    log_bytes(ctx, SAMPLES_FILE, data, "samples")
