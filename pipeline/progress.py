"""Live progress of running stages, from the stage actors to the driver's console.

Stage code anywhere in a stage actor's process (the stage's run function, the task runner,
the train stage's metric sink) calls ``report(done, total, unit, **details)``; each report
goes to a ``ProgressBoard`` actor that the driver reads twice a second to draw its display
(``pipeline.console``). Reports are dropped rather than queued when they come faster than
``MIN_INTERVAL`` (the last of a phase always goes), so reporting costs nothing a stage
would notice. Outside a pipeline run (tests, tools) ``report`` does nothing. ``PhaseBar``
counts a phase of work for either audience: reports under a run, a tqdm bar outside one.
This module imports no Ray (the train package, which reports, must import on a bare
accelerator host).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

MIN_INTERVAL = 0.5
"""Seconds between two reports of one stage that are both sent."""


@dataclass(frozen=True)
class Progress:
    """Where one stage is: ``done`` of ``total`` ``unit`` in its current phase."""

    done: float
    total: float | None
    unit: str
    phase_started: float
    """When the stage first reported this phase (its unit and total), for the rate."""
    details: dict[str, float | str] = field(default_factory=dict)
    """What else a person wants to see (train: loss, val_loss, lr, tokens_per_s, mfu)."""

    def rate(self, now: float) -> float | None:
        """Units per second since the phase started."""
        elapsed = now - self.phase_started
        return self.done / elapsed if elapsed > 0 and self.done > 0 else None

    def eta(self, now: float) -> float | None:
        """Seconds left at the phase's rate so far."""
        rate = self.rate(now)
        if rate is None or self.total is None:
            return None
        return max(0.0, (self.total - self.done) / rate)


class ProgressBoard:
    """The latest ``Progress`` of every stage that reported (run as a Ray actor)."""

    def __init__(self) -> None:
        self.stages: dict[str, Progress] = {}

    def update(
        self,
        stage: str,
        done: float,
        total: float | None,
        unit: str,
        details: dict[str, float | str],
        at: float,
    ) -> None:
        last = self.stages.get(stage)
        same_phase = last is not None and (last.unit, last.total) == (unit, total)
        started = last.phase_started if same_phase else at
        self.stages[stage] = Progress(done, total, unit, started, details)

    def snapshot(self) -> dict[str, Progress]:
        return dict(self.stages)


@dataclass
class _Reporter:
    board: Any
    """The ``ProgressBoard`` actor's handle."""
    stage: str
    last_sent: float = 0.0


_reporter: _Reporter | None = None


@contextmanager
def reporting(board: Any, stage: str) -> Iterator[None]:
    """While the body runs, ``report`` in this process sends ``stage``'s progress to
    ``board`` (None: nowhere)."""
    global _reporter
    previous = _reporter
    _reporter = _Reporter(board, stage) if board is not None else None
    if board is not None:
        board.update.remote(stage, 0, None, "", {}, time.time())  # running, nothing counted
    try:
        yield
    finally:
        _reporter = previous


def reported() -> bool:
    """Whether this process's progress goes to a run's display (a progress bar of its own
    would only repeat it in the stage's log)."""
    return _reporter is not None


def report(done: float, total: float | None, unit: str, **details: float | str) -> None:
    """The running stage has done ``done`` of ``total`` ``unit`` (None: unknown total)."""
    reporter = _reporter
    if reporter is None:
        return
    now = time.time()
    if now - reporter.last_sent < MIN_INTERVAL and done != total:
        return
    reporter.last_sent = now
    reporter.board.update.remote(reporter.stage, done, total, unit, details, now)


class PhaseBar:
    """Counts one phase of a stage's work (``total`` ``unit``, None: not yet known): as
    reports to the run's display inside ``meshline run``, and as a tqdm bar on stderr
    outside one (the standalone commands, benchmarks). Phases shorter than ``min_bar``
    units get no bar. Use as a context manager."""

    def __init__(self, total: int | None, unit: str, desc: str, min_bar: int = 0):
        self.done = 0
        self.total = total
        self.unit = unit
        self.desc = desc
        hidden = reported() or (total is not None and total < min_bar)
        self._bar = tqdm(total=total, unit=unit, desc=desc, disable=hidden)
        report(0, total, unit, phase=desc)

    def set_total(self, total: int) -> None:
        self.total = total
        self._bar.total = total

    def set_postfix(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1, **details: float | str) -> None:
        self.done += n
        self._bar.update(n)
        report(self.done, self.total, self.unit, phase=self.desc, **details)

    def __enter__(self) -> PhaseBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
