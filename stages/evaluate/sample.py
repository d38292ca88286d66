"""``meshline sample CHECKPOINT "prompt"``: greedy and nucleus continuations side by side.

As the GPT-J release showed its model, each prompt is continued twice: greedily and with
nucleus sampling (top_p 0.9, temperature 1), printed in two columns. CHECKPOINT is a train
stage output (its tokenizer comes from ``--tokenizer`` or from the tokenize stage the train
stage recorded as its input), a convert stage output, or a Hugging Face export directory
(``models.load_model``); the continuations are ``generation``'s. The evaluate stage logs the
same rendering (``columns.side_by_side``) for a few prompts as an MLflow artifact.

The command is registered through the ``meshline.commands`` entry point; this module stays
light at import (JAX loads when the command runs).
"""

from __future__ import annotations

import argparse
import sys

from stages.evaluate.columns import side_by_side


def command(args: argparse.Namespace) -> int:
    """Print greedy and nucleus continuations of the prompt; 2 on bad input."""
    # JAX loads here, when the command runs, not when ``meshline`` lists its commands.
    from stages.evaluate import generation, models

    try:
        config, params, tokenizer = models.load_model(args.checkpoint, args.tokenizer, args.step)
        ((greedy, nucleus),) = generation.continuations(
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
