"""Two tiny stages for executor tests: ``numbers`` writes units of integers and ``total``
sums them (and may register its output as a model version linked to ``numbers``' run, as
the convert stage registers its export linked to the training run). Knobs let a test make
a unit fail, kill the stage's own process once, or change the output without changing the
fingerprint (as a code change would)."""

from __future__ import annotations

import json
import os
import posixpath
import signal
import time
from pathlib import Path

import ray.exceptions
from pydantic import Field

from pipeline import storage
from pipeline.stage import StageConfig, StageContext, register


class NumbersConfig(StageConfig):
    units: int = Field(default=3, ge=1)
    """How many units (files) to write."""
    per_unit: int = 5
    """Integers per unit."""
    offset: int = 0
    """Added to every integer. Volatile on purpose: it changes the output but not the
    fingerprint, the way a code change does."""
    fail_unit: int | None = None
    """Raise while producing this unit."""
    die_at_unit: int | None = None
    """SIGKILL the stage's own process before this unit, once (a marker file remembers)."""
    lose_node_at_unit: int | None = None
    """Fail before this unit, once, with the error a Ray Data step gives when a node it had
    placed work on is gone (ActorUnschedulableError)."""

    volatile_fields = frozenset({"offset", "fail_unit", "die_at_unit", "lose_node_at_unit"})


class TotalConfig(StageConfig):
    scale: int = 1
    """Multiplies the total."""
    registered_model: str | None = None
    """Register the output as a new version of this MLflow model."""

    volatile_fields = frozenset({"registered_model"})


@register("numbers", NumbersConfig)
def run_numbers(ctx: StageContext) -> None:
    config: NumbersConfig = ctx.config
    written = 0
    for i in range(config.units):
        name = f"part-{i:02d}"
        if ctx.ledger.is_committed(name):
            continue
        if config.fail_unit == i:
            raise RuntimeError(f"unit {name} failed on purpose")
        marker = storage.join(ctx.output, "died-once")
        if config.die_at_unit == i and not storage.exists(marker):
            storage.write_atomic(marker, b"")
            os.kill(os.getpid(), signal.SIGKILL)
        lost = storage.join(ctx.output, "node-lost-once")
        if config.lose_node_at_unit == i and not storage.exists(lost):
            storage.write_atomic(lost, b"")
            raise ray.exceptions.ActorUnschedulableError(f"the node of {name}'s worker is gone")
        with ctx.ledger.unit(name) as unit, unit.open(f"{name}.json") as f:
            values = [config.offset + i * config.per_unit + k for k in range(config.per_unit)]
            f.write(json.dumps(values).encode())
        written += 1
    ctx.record(units_written=written)


@register("total", TotalConfig, inputs=("numbers",))
def run_total(ctx: StageContext) -> None:
    source = ctx.inputs["numbers"].uri
    files = [f for f in storage.list_files(source) if f.endswith(".json") and "/_meta/" not in f]
    total = sum(sum(json.loads(storage.read_text(f))) for f in files) * ctx.config.scale
    with ctx.ledger.unit("total") as unit, unit.open("total.txt") as f:
        f.write(str(total).encode())
    ctx.record(total=total)
    if ctx.config.registered_model:
        ctx.register_model(
            ctx.config.registered_model,
            Path(ctx.output).as_uri(),
            ctx.inputs["numbers"].run_id or None,
            {"meshline.output_digest": ctx.ledger.digest()},
        )


class RendezvousConfig(StageConfig):
    partner: str
    """The other stage, which must be running at the same time as this one."""
    wait_seconds: float = 120
    """Give up waiting for the partner after this long."""


def _rendezvous(ctx: StageContext) -> None:
    """Leave a marker and wait for the partner's: only concurrent stages both finish."""
    config: RendezvousConfig = ctx.config
    root = posixpath.dirname(ctx.output)
    mine = storage.join(root, f"arrived-{ctx.name}")
    partner = storage.join(root, f"arrived-{config.partner}")
    storage.write_atomic(mine, b"")
    deadline = time.monotonic() + config.wait_seconds
    while not storage.exists(partner):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ctx.name}: {config.partner} never ran alongside")
        time.sleep(0.05)


register("ping", RendezvousConfig)(_rendezvous)
register("pong", RendezvousConfig)(_rendezvous)
