"""The train stage: the model config, then a Ray Train worker group training to ``steps``, then a
summary.

Output (``{out}``): the model config, Orbax checkpoints and a summary, in the format that
``stages.train.output`` defines and reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.progress import report
from pipeline.stage import StageContext, register
from stages.train.config import TrainConfig, training_model_config

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """The hosts saved a checkpoint on SIGTERM and stopped; a rerun continues from it."""


SHOWN = ("loss", "val_loss", "lr", "tokens_per_s", "mfu")
"""The metrics a person follows training by, in the console's order."""


def _progress(ctx: StageContext, config: TrainConfig) -> Callable[[dict[str, float]], None]:
    """Sends every metric record to MLflow and to the run's live display, and logs a
    progress line about 20 times a run (and at every validation), so a long run's log shows
    where it is."""
    every = max(1, config.steps // 20)
    latest: dict[str, float] = {}

    def sink(metrics: dict[str, float]) -> None:
        ctx.log_metrics(metrics)
        step = int(metrics.get("step", 0))
        latest.update((key, metrics[key]) for key in SHOWN if key in metrics)
        report(step, config.steps, "steps", **latest)
        if "val_loss" in metrics or step % every == 0:
            shown = ", ".join(f"{key} {metrics[key]:.4g}" for key in SHOWN if key in metrics)
            log.info("train: step %d/%d: %s", step, config.steps, shown)

    return sink


@register("train", TrainConfig, inputs=("tokenize",))
def run(ctx: StageContext) -> None:
    """Write the model config, train (resuming from the last checkpoint), summarise."""
    # JAX, Orbax, Ray Train and the tokenize package (Ray Data) load when the stage runs, not
    # when it registers: the hosts import this package for the trainer, and the model, its
    # optimiser and step import without Ray (benchmarks/train.py on a bare accelerator host).
    from stages.tokenize import read_manifest
    from stages.train import output
    from stages.train.hosts import run_hosts

    config: TrainConfig = ctx.config
    tokenize = ctx.inputs["tokenize"].uri
    vocab = int(read_manifest(tokenize)["tokenizer"]["vocab_size"])
    output.commit_model_config(ctx.ledger, training_model_config(config, vocab))
    cache = config.compilation_cache or ctx.compilation_cache
    hosts_config = config.model_copy(update={"compilation_cache": cache})
    result = run_hosts(hosts_config, tokenize, ctx.output, _progress(ctx, config), ctx.node_metrics)
    if result["preempted"]:
        raise Preempted(f"train: preempted at step {result['step']}; its checkpoint is saved")
    output.commit_summary(ctx.ledger, result)
    ctx.record(final_train_loss=result["train_loss"], final_val_loss=result["val_loss"])
    log.info(
        "train: %d steps, train loss %.4f, val loss %.4f",
        result["step"],
        result["train_loss"],
        result["val_loss"],
    )
