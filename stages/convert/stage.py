"""The ``convert`` pipeline stage: the train stage's checkpoint as a Hugging Face directory,
registered in the MLflow Model Registry.

Output (``{out}``): one ledger unit, ``model``: the directory ``{out}/model/`` streamed from
the checkpoint (latest or ``step``) with the tokenize stage's tokenizer and EOS id. The
directory is then registered as a new version of an MLflow registered model (``{source}``
the directory's URI) linked to the run that trained it (the train input's MLflow run) and
tagged with the digests and fingerprints of the outputs it came from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline import storage
from pipeline.stage import StageContext, register
from stages.convert.config import ConvertConfig

log = logging.getLogger(__name__)

MODEL_UNIT = "model"


def _export(ctx: StageContext, config: ConvertConfig) -> None:
    # JAX and Orbax load when the stage runs, not when it registers (meshline status).
    from stages.convert.checkpoint import export_checkpoint
    from stages.tokenize import read_manifest
    from stages.train.output import CheckpointReader, read_model_config

    train, tokenize = ctx.inputs["train"].uri, ctx.inputs["tokenize"].uri
    model = read_model_config(train)
    eos = int(read_manifest(tokenize)["eos_id"])
    with CheckpointReader(train, config.step) as reader, ctx.ledger.unit(MODEL_UNIT) as unit:
        summary = export_checkpoint(
            reader,
            model,
            lambda name: unit.open(f"{MODEL_UNIT}/{name}"),
            dtype=config.dtype,
            max_shard_bytes=config.max_shard_bytes,
            tokenizer_dir=storage.join(tokenize, "tokenizer"),
            eos_token_id=eos,
        )
        unit.metadata.update(
            dtype=config.dtype, step=reader.step, bytes=summary.bytes, tensors=summary.tensors
        )
    ctx.record(export_seconds=summary.seconds, export_mb_per_s=summary.mb_per_s)
    log.info("convert: step %d -> %s/%s: %s", reader.step, ctx.output, MODEL_UNIT, summary.line())


def _source_uri(directory: str) -> str:
    return directory if storage.is_gcs(directory) else Path(os.path.abspath(directory)).as_uri()


def _register(ctx: StageContext, config: ConvertConfig) -> str:
    train, tokenize = ctx.inputs["train"], ctx.inputs["tokenize"]
    exported = ctx.ledger.record(MODEL_UNIT)["metadata"]
    tags = {
        "meshline.output_digest": ctx.ledger.digest(),
        "meshline.train_output": train.uri,
        "meshline.train_fingerprint": train.fingerprint,
        "meshline.train_digest": train.digest,
        "meshline.tokenize_output": tokenize.uri,
        "meshline.tokenize_digest": tokenize.digest,
        "meshline.step": str(exported["step"]),
        "meshline.dtype": exported["dtype"],
    }
    source = _source_uri(storage.join(ctx.output, MODEL_UNIT))
    return ctx.register_model(config.registered_model, source, train.run_id or None, tags)


@register("convert", ConvertConfig, inputs=("train", "tokenize"))
def run(ctx: StageContext) -> None:
    """Export the checkpoint to ``{out}/model/`` (unless committed already) and register it."""
    config: ConvertConfig = ctx.config
    if ctx.ledger.is_committed(MODEL_UNIT):
        log.info("convert: %s/%s already exported", ctx.output, MODEL_UNIT)
    else:
        _export(ctx, config)
    ctx.record(export_bytes=ctx.ledger.record(MODEL_UNIT)["metadata"]["bytes"])
    version = _register(ctx, config)
    if version:
        log.info("convert: registered model version %s", version)
