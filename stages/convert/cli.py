"""``meshline convert export|import``: conversions outside a pipeline run.

``meshline convert export TRAIN_OUTPUT DEST [--step N] [--dtype bfloat16] [--tokenizer
TOKENIZE_OUTPUT] [--max-shard-bytes N]`` streams a train output's checkpoint into a new
Hugging Face directory (local or ``gs://``). ``meshline convert import HF_DIR DEST
[--trust-pickle]`` writes a Hugging Face GPT-J / GPT-NeoX directory (local or ``gs://``) as a
params-only train output that ``train.init_from`` fine-tunes from. Bad input exits with 2 and
a message naming the path.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args

from stages.convert.config import DEFAULT_MAX_SHARD_BYTES, ExportDtype

EXIT_BAD_INPUT = 2


def _fail(error: Exception) -> int:
    print(f"meshline convert: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _export(args: argparse.Namespace) -> int:
    # NumPy, safetensors and JAX load when the command runs, not when meshline builds its parser.
    from stages.convert.checkpoint import export_train_output
    from stages.convert.layout import ConvertError

    try:
        summary = export_train_output(
            args.train_output,
            args.dest,
            step=args.step,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes,
            tokenize_output=args.tokenizer,
        )
    except (ConvertError, FileExistsError, FileNotFoundError) as error:
        return _fail(error)
    print(f"exported {args.dest}: {summary.line()}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from stages.convert.checkpoint import import_checkpoint
    from stages.convert.layout import ConvertError

    try:
        config = import_checkpoint(args.hf_dir, args.dest, trust_pickle=args.trust_pickle)
    except (ConvertError, FileExistsError, FileNotFoundError) as error:
        return _fail(error)
    print(
        f"imported {args.hf_dir} -> {args.dest} ({config.architecture}, {config.n_layers} layers)"
    )
    return 0


def add_command(subparsers: Any) -> None:
    """Add ``convert`` with its ``export`` and ``import`` subcommands to ``meshline``."""
    parser = subparsers.add_parser(
        "convert", help="JAX checkpoints to and from Hugging Face directories"
    )
    directions = parser.add_subparsers(dest="direction", required=True)
    export = directions.add_parser("export", help="a train output's checkpoint -> HF directory")
    export.add_argument("train_output", help="train stage output dir")
    export.add_argument("dest", help="new directory, local or gs://")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    export.add_argument("--dtype", choices=get_args(ExportDtype), default="float32")
    export.add_argument(
        "--tokenizer",
        metavar="TOKENIZE_OUTPUT",
        help="tokenize stage output whose tokenizer and EOS id go with the model",
    )
    export.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    export.set_defaults(handler=_export)
    imported = directions.add_parser("import", help="HF directory -> params-only train output")
    imported.add_argument("hf_dir", help="Hugging Face GPT-J or GPT-NeoX directory")
    imported.add_argument("dest", help="new local directory")
    imported.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pytorch_model*.bin pickles (loading one can run code)",
    )
    imported.set_defaults(handler=_import)
