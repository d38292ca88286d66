"""What the pipeline logs and where: the console (our INFO lines, libraries' warnings) and
each stage's own log, kept in ``{output}/_meta/log.txt`` and in the stage's MLflow run with
the traceback of a failure, which the console shows as one line.

A rerun appends to the log of the runs before it; the file keeps the last ``MAX_LOG_BYTES``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline import storage
from pipeline.ledger import META_DIR

LOG_FILE = f"{META_DIR}/log.txt"
"""Where in a stage's output its log is kept."""
MAX_LOG_BYTES = 4 << 20
"""The most of a stage's log kept (its end): a training run of weeks logs a line per
``log_every`` steps for its whole length."""
_NAMED_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OUR_LOGGERS = ("meshline", "pipeline", "stages")
"""The loggers whose INFO lines a person running the pipeline reads."""


def console_logging(fmt: str = "%(message)s") -> None:
    """Our INFO lines from this process reach the console (from a Ray worker, through Ray's
    log forwarding); libraries' (MLflow, Orbax, JAX) only from WARNING. ``force``: a library
    imported before (absl, through Orbax) has already given the root logger a handler, so a
    plain ``basicConfig`` would do nothing and leave our loggers at the root's WARNING."""
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # MLflow gives its logger its own INFO level and handler when imported (store set-up lines).
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Warnings of logger ``logger_name`` dropped while the block runs (errors still show)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def kept_log(output: str, log_artifact: Callable[[str, str], None]) -> Iterator[None]:
    """While the body runs, what reaches this process's root logger is also written to a
    local file; at the end (a failure's traceback added) it is appended to the stage's
    ``LOG_FILE`` and logged to its MLflow run under ``logs/``."""
    with tempfile.TemporaryDirectory(prefix="meshline-log-") as directory:
        path = os.path.join(directory, os.path.basename(LOG_FILE))
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        logging.getLogger().addHandler(handler)
        try:
            yield
        except BaseException:
            handler.stream.write(traceback.format_exc())
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
            _append(storage.join(output, LOG_FILE), path)
            log_artifact(path, "logs")


def _append(uri: str, path: str) -> None:
    """``uri`` becomes its old content and then ``path``'s, cut to its last bytes."""
    with open(path, "rb") as f:
        new = f.read()
    old = storage.read_bytes(uri) if storage.exists(uri) else b""
    storage.write_atomic(uri, (old + new)[-MAX_LOG_BYTES:])


def last_line(error: BaseException) -> str:
    """The line of an error's message that says what went wrong: Ray's errors carry the
    cause's traceback, whose last ``SomeError: message`` line is the cause (a library's
    message may go on with lines of detail after it), else the message's last line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    named = [i for i, line in enumerate(lines) if _NAMED_ERROR.match(line)]
    if not named:
        return lines[-1] if lines else type(error).__name__
    at = named[-1]
    # A message ending in ":" introduces a list (the files that failed): keep its first item.
    if lines[at].endswith(":") and at + 1 < len(lines):
        return f"{lines[at]} {lines[at + 1]}"
    return lines[at]
