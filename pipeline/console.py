"""What ``meshline run`` draws while stages run: one live table on a terminal, plain
timestamped lines otherwise.

On a terminal (rich's ``Live``) each stage has a line: its state, units done of total in
the stage's own unit, the rate, the ETA and the details it reports (train: loss, val loss,
lr, tokens/s, MFU), redrawn each time the driver reads the stages' progress (every second);
the stages' own log lines print above it. When the output is not a terminal (CI,
``meshline submit`` job logs, ``| tee``) a running stage gets a line at most every
``PLAIN_EVERY`` seconds instead of redraws.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.progress import Progress

PLAIN_EVERY = 30.0
"""Seconds between two progress lines of one stage when the output is not a terminal."""
WAITING, RUNNING = "waiting", "running"


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def describe(progress: Progress, now: float) -> tuple[str, str, str, str]:
    """(done/total unit, rate, ETA, details) of one stage, as text."""
    if not progress.unit:
        return "", "", "", ""
    total = "" if progress.total is None else f"/{_number(progress.total)}"
    amount = f"{_number(progress.done)}{total} {progress.unit}"
    rate = progress.rate(now)
    speed = "" if rate is None else f"{_number(rate)} {progress.unit}/s"
    details = ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in progress.details.items()
    )
    return amount, speed, _duration(progress.eta(now)), details


class RunDisplay:
    """The display of one run: ``state`` when a stage's state changes, ``show`` with the
    board's latest progress."""

    def __init__(self, stages: list[str], live: Live | None, stream: IO[str]):
        self.states = dict.fromkeys(stages, WAITING)
        self.progress: dict[str, Progress] = {}
        self.live = live
        self.stream = stream
        self.last_plain: dict[str, float] = {}

    def state(self, stage: str, state: str) -> None:
        self.states[stage] = state
        self._redraw()

    def show(self, progress: dict[str, Progress]) -> None:
        for stage in progress:
            if self.states.get(stage) == WAITING:
                self.states[stage] = RUNNING
        self.progress = progress
        if self.live is not None:
            self._redraw()
            return
        now = time.time()
        for stage, current in progress.items():
            if self.states[stage] != RUNNING or now - self.last_plain.get(stage, 0) < PLAIN_EVERY:
                continue
            self.last_plain[stage] = now
            amount, speed, eta, details = describe(current, now)
            parts = [amount, speed, f"ETA {eta}" if eta else "", details]
            line = ", ".join(p for p in parts if p)
            if not line:
                continue
            print(f"{time.strftime('%H:%M:%S')} {stage}: {line}", file=self.stream, flush=True)

    def table(self) -> Table:
        now = time.time()
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("stage", "state", "done", "rate", "ETA", ""):
            table.add_column(column, no_wrap=column != "")
        for stage, state in self.states.items():
            current = self.progress.get(stage)
            cells = describe(current, now) if current and state == RUNNING else ("",) * 4
            table.add_row(stage, state, *cells)
        return table

    def _redraw(self) -> None:
        if self.live is not None:
            self.live.update(self.table(), refresh=True)


@contextmanager
def run_display(stages: list[str], stream: IO[str] | None = None) -> Iterator[RunDisplay]:
    """A ``RunDisplay`` for ``stages``: live on a terminal, plain lines otherwise."""
    stream = stream or sys.stdout
    if not stream.isatty():
        yield RunDisplay(stages, None, stream)
        return
    # soft_wrap: the stages' lines print above the table as they are, long ones wrapped by the
    # terminal rather than cut into columns.
    console = Console(file=stream, soft_wrap=True)
    display = RunDisplay(stages, None, stream)
    with Live(display.table(), console=console, auto_refresh=False, transient=False) as live:
        # Live prints what goes to sys.stdout and sys.stderr above the table; log handlers
        # hold the streams they were given, so they are pointed at its stand-ins meanwhile.
        handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
        streams = [h.setStream(sys.stderr) for h in handlers]
        display.live = live
        try:
            yield display
        finally:
            for handler, original in zip(handlers, streams, strict=True):
                handler.setStream(original)
