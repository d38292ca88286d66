"""``meshline sample CHECKPOINT "prompt"``: greedy and nucleus continuations side by side.

As the GPT-J release showed its model, each prompt is continued twice: greedily and with
nucleus sampling (top_p 0.9, temperature 1), printed in two columns. CHECKPOINT is a train
stage output (its tokenizer comes from ``--tokenizer`` or from the tokenize stage the train
stage recorded as its input), a convert stage output, or a Hugging Face export directory.
The evaluate stage logs the same rendering for a few prompts as an MLflow artifact.

The command is registered through the ``meshline.commands`` entry point; this module stays
light at import (JAX loads when the command runs).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.stage import read_resolved_config, resolved_config_path

if TYPE_CHECKING:
    from stages.tokenize import Tokenizer
    from stages.train.hf_mapping import Params
    from stages.train.model_config import ModelConfig

TOP_P = 0.9
COLUMN = 48
HF_INDEX_FILES = ("model.safetensors.index.json", "model.safetensors")


class SampleError(ValueError):
    """A checkpoint path that cannot be sampled from; the message says why."""


def continuations(
    config: ModelConfig,
    params: Params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int,
) -> list[tuple[str, str]]:
    """(greedy, nucleus) continuation of each prompt, cut at the first EOS."""
    import jax

    from stages.train.generate import GREEDY, Sampling, generate

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


def _wrapped(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, keeping the text's own line breaks."""
    lines = []
    for line in text.split("\n"):
        lines.extend(textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False))
        if not line:
            lines.append("")
    return lines


def side_by_side(prompt: str, greedy: str, nucleus: str, width: int = COLUMN) -> str:
    """The prompt, then the two continuations in columns."""
    left = _wrapped(greedy, width)
    right = _wrapped(nucleus, width)
    header = ["greedy".ljust(width), f"nucleus (top_p {TOP_P}, temperature 1)"]
    rows = [f"prompt: {prompt!r}", " | ".join(header).rstrip(), f"{'-' * width}-+-{'-' * width}"]
    for a, b in itertools.zip_longest(left, right, fillvalue=""):
        rows.append(f"{a.ljust(width)} | {b}".rstrip())
    return "\n".join(rows)


def _is_hf_dir(path: str) -> bool:
    has_weights = any(os.path.exists(os.path.join(path, f)) for f in HF_INDEX_FILES)
    return os.path.exists(os.path.join(path, "config.json")) and has_weights


def _recorded_tokenizer(train: str) -> str:
    """The tokenize output the train stage read, from the executor's resolved config."""
    recorded = read_resolved_config(train) or {}
    for upstream in recorded.get("inputs", []):
        if upstream.get("stage") == "tokenize":
            return upstream["uri"]
    raise SampleError(
        f"{train}: no tokenize input recorded in {resolved_config_path(train)}; "
        "pass --tokenizer DIR"
    )


def load_model(
    path: str, tokenizer_dir: str | None, step: int | None
) -> tuple[ModelConfig, Params, Tokenizer]:
    """Config, params and tokenizer of a train output, convert output or HF export."""
    from stages.tokenize import load_tokenizer

    if _is_hf_dir(os.path.join(path, "model")):
        path = os.path.join(path, "model")
    if _is_hf_dir(path):
        from stages.convert import import_hf
        from stages.evaluate.lm import hf_dir_tokenizer

        params, config = import_hf(path)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else hf_dir_tokenizer(path)
        return config, params, tokenizer
    if os.path.exists(os.path.join(path, "model_config.json")):
        from stages.evaluate.stage import checkpoint_step, final_params

        config, params = final_params(path, checkpoint_step(path, step))
        tokenizer = load_tokenizer(tokenizer_dir or _recorded_tokenizer(path))
        return config, params, tokenizer
    raise SampleError(
        f"{path}: neither a train stage output (model_config.json and checkpoints/) nor a "
        "Hugging Face export (config.json and model.safetensors[.index.json])"
    )


def command(args: argparse.Namespace) -> int:
    """Print greedy and nucleus continuations of the prompt; 2 on bad input."""
    try:
        config, params, tokenizer = load_model(args.checkpoint, args.tokenizer, args.step)
        ((greedy, nucleus),) = continuations(
            config, params, tokenizer, [args.prompt], args.max_new_tokens, args.seed
        )
    except (OSError, ValueError) as error:
        print(f"meshline sample: {error}", file=sys.stderr)
        return 2
    print(side_by_side(args.prompt, greedy, nucleus))
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """The ``meshline sample`` subcommand (a ``meshline.commands`` entry point)."""
    parser = subparsers.add_parser(
        "sample", help="greedy and nucleus (top_p 0.9) continuations of a prompt, side by side"
    )
    parser.add_argument("checkpoint", help="train or convert stage output, or a HF export dir")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the nucleus sample")
    parser.add_argument("--tokenizer", help="tokenize stage output (default: the recorded one)")
    parser.add_argument("--step", type=int, help="checkpoint step of a train output (latest)")
    parser.set_defaults(handler=command)
