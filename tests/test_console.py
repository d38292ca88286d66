"""The run's live display: progress reported from a stage's process through the board actor,
and what the driver draws of it (a rich table on a terminal, bounded plain lines otherwise)."""

from __future__ import annotations

import io
import re
import time

import ray
from rich.console import Console

from pipeline import progress
from pipeline.console import PLAIN_EVERY, RUNNING, RunDisplay, describe, run_display
from pipeline.logs import last_line
from pipeline.progress import Progress, ProgressBoard, report, reporting


def test_reports_reach_the_board_rate_limited_with_each_phase_timed_apart(ray_cluster):
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    report(1, 2, "files")  # outside a stage: nowhere, no error
    with reporting(board, "dedup"):
        report(0, 6, "units", phase="parse")
        for done in range(1, 6):
            report(done, 6, "units", phase="parse")  # within MIN_INTERVAL: dropped
        report(6, 6, "units", phase="parse")  # the end of a phase always goes
        parse = ray.get(board.snapshot.remote())["dedup"]
        time.sleep(progress.MIN_INTERVAL)
        report(1, 4, "units", phase="exact")
        exact = ray.get(board.snapshot.remote())["dedup"]
    assert (parse.done, parse.total, parse.unit, parse.details) == (
        6,
        6,
        "units",
        {"phase": "parse"},
    )
    assert (exact.done, exact.total, exact.details) == (1, 4, {"phase": "exact"})
    assert exact.phase_started > parse.phase_started
    assert progress._reporter is None
    ray.kill(board)


def test_describe_gives_amount_rate_eta_and_details():
    now = time.time()
    train = Progress(50, 150, "steps", now - 10, {"loss": 4.5, "tokens_per_s": 10230.0})
    assert describe(train, now) == (
        "50/150 steps",
        "5 steps/s",
        "0:00:20",
        "loss 4.5, tokens_per_s 1.023e+04",
    )
    unknown = Progress(3, None, "files", now - 1, {})
    assert describe(unknown, now)[0] == "3 files" and describe(unknown, now)[2] == ""
    assert describe(Progress(0, None, "", now, {}), now) == ("", "", "", "")


def test_plain_lines_come_at_a_bounded_rate_and_the_table_shows_every_stage():
    stream = io.StringIO()
    display = RunDisplay(["tokenize", "train", "evaluate"], None, stream)
    now = time.time()
    display.show({"train": Progress(10, 150, "steps", now - 5, {"loss": 6.1})})
    display.show({"train": Progress(12, 150, "steps", now - 5, {"loss": 5.9})})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d train: 10/150 steps, 2 steps/s, ETA 0:01:10, loss 6.1", lines[0]
    )
    display.last_plain["train"] -= PLAIN_EVERY
    display.show({"train": Progress(20, 150, "steps", now - 10, {"loss": 5.0})})
    assert "train: 20/150 steps" in stream.getvalue().splitlines()[-1]
    display.state("tokenize", "done")
    assert display.states == {"tokenize": "done", "train": RUNNING, "evaluate": "waiting"}
    drawn = io.StringIO()
    Console(file=drawn, width=160).print(display.table())
    rows = drawn.getvalue().splitlines()
    assert rows[0].split() == ["stage", "state", "done", "rate", "ETA"]
    assert rows[1].split() == ["tokenize", "done"]
    assert rows[2].split()[:4] == ["train", "running", "20/150", "steps"]
    assert "loss 5" in rows[2] and rows[3].split() == ["evaluate", "waiting"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_table_is_redrawn_with_prints_above_it():
    screen = Terminal()
    with run_display(["download", "dedup"], screen) as display:
        assert display.live is not None
        print("a stage's log line")
        display.state("download", "done")
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "a stage's log line" in drawn
    assert re.search(r"download\s+done", drawn) and re.search(r"dedup\s+waiting", drawn)


def test_an_errors_line_is_its_cause_with_the_first_item_it_lists():
    wrapped = RuntimeError(
        "ray::StageActor.execute()\n  File x, line 3\n"
        "stages.download.config.DownloadError: download failed for 1 of 2 files:\n"
        "  http://h/x.jsonl: failed after 0 retries\n"
    )
    assert last_line(wrapped) == (
        "stages.download.config.DownloadError: download failed for 1 of 2 files: "
        "http://h/x.jsonl: failed after 0 retries"
    )
    library = RuntimeError("RestException: UNIQUE constraint failed\n[SQL: INSERT]\n(Background)")
    assert last_line(library) == "RestException: UNIQUE constraint failed"
    assert last_line(ValueError("no such stage\nknown: a, b")) == "known: a, b"
