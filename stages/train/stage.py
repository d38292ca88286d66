"""The train stage: the model config, then Ray host actors training to ``steps``, then a
summary.

Output (``{out}``): ``model_config.json`` (the ``ModelConfig`` convert and evaluate rebuild
the model from), ``checkpoints/`` (Orbax: ``{step}/state`` params, optimiser state and RNG,
``{step}/meta`` step and loader position; the latest is the trained model) and
``summary.json`` (steps, final train and val loss, the float32 params' sha256). The two
JSON files go through the ledger, so the stage digest changes when the trained parameters
do; the checkpoints are Orbax's own atomic directories.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from pipeline.stage import StageContext, register
from stages.tokenize import read_manifest
from stages.train.config import TrainConfig

log = logging.getLogger(__name__)

MODEL_CONFIG = "model_config.json"
SUMMARY = "summary.json"


class Preempted(RuntimeError):
    """The hosts saved a checkpoint on SIGTERM and stopped; a rerun continues from it."""


def _progress(ctx: StageContext, config: TrainConfig) -> Callable[[dict[str, float]], None]:
    """Sends every metric record to MLflow and logs a progress line about 20 times a run
    (and at every validation), so a long run shows where it is."""
    every = max(1, config.steps // 20)

    def sink(metrics: dict[str, float]) -> None:
        ctx.log_metrics(metrics)
        step = int(metrics.get("step", 0))
        if "val_loss" in metrics or step % every == 0:
            shown = ", ".join(
                f"{key} {metrics[key]:.4g}"
                for key in ("loss", "val_loss", "lr", "tokens_per_s", "mfu")
                if key in metrics
            )
            log.info("train: step %d/%d: %s", step, config.steps, shown)

    return sink


@register("train", TrainConfig, inputs=("tokenize",))
def run(ctx: StageContext) -> None:
    """Write the model config, train (resuming from the last checkpoint), summarise."""
    from stages.train.hosts import run_hosts
    from stages.train.trainer import model_config

    config: TrainConfig = ctx.config
    tokenize = ctx.inputs["tokenize"].uri
    vocab = int(read_manifest(tokenize)["tokenizer"]["vocab_size"])
    if not ctx.ledger.is_committed(MODEL_CONFIG):
        model = model_config(config, vocab)
        with ctx.ledger.unit(MODEL_CONFIG) as unit, unit.open(MODEL_CONFIG) as f:
            f.write(model.model_dump_json(indent=1).encode())
    result = run_hosts(config, tokenize, ctx.output, _progress(ctx, config))
    if result["preempted"]:
        raise Preempted(f"train: preempted at step {result['step']}; its checkpoint is saved")
    summary = {k: result[k] for k in ("step", "train_loss", "val_loss", "params_sha256")}
    with ctx.ledger.unit(SUMMARY) as unit, unit.open(SUMMARY) as f:
        f.write(json.dumps(summary, indent=1).encode())
    ctx.record(final_train_loss=result["train_loss"], final_val_loss=result["val_loss"])
    log.info(
        "train: %d steps, train loss %.4f, val loss %.4f",
        result["step"],
        result["train_loss"],
        result["val_loss"],
    )
