"""A stage output's status file and the lease that a live runner keeps renewing.

``{output}/_meta/status.json`` says RUNNING, SUCCESS or FAILED. A RUNNING status names
its owner (host, pid, pipeline invocation) and a heartbeat time; while the owner lives, a
background thread renews the heartbeat. Another runner may take the stage over when the
heartbeat is older than the lease, or at once when the owner is a process on this host
that no longer exists (a killed actor or driver), so a rerun never waits out a lease
left by a crash on the same machine.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import storage
from pipeline.ledger import META_DIR

RUNNING, SUCCESS, FAILED = "RUNNING", "SUCCESS", "FAILED"


class StageBusy(RuntimeError):
    """Another live runner holds the stage's lease."""


@dataclass
class Status:
    state: str
    invocation: str
    """Id of the ``meshline run`` that wrote this status."""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    node: str | None = None
    """Ray node id of the runner's process (several nodes may share one host)."""
    heartbeat: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    mlflow_run_id: str | None = None
    digest: str | None = None
    """Content digest of the finished output (SUCCESS only)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Upstream stage -> the digest of its output that this run read."""
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def status_uri(output: str) -> str:
    return storage.join(output, META_DIR, "status.json")


def read_status(output: str) -> Status | None:
    uri = status_uri(output)
    if not storage.exists(uri):
        return None
    return Status(**json.loads(storage.read_text(uri)))


def _encode(status: Status) -> bytes:
    return json.dumps(asdict(status), indent=1).encode()


def write_status(output: str, status: Status) -> None:
    storage.write_atomic(status_uri(output), _encode(status))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(status: Status, lease_seconds: float) -> bool:
    """Whether a RUNNING status has lost its runner."""
    if time.time() - status.heartbeat > lease_seconds:
        return True
    return status.host == socket.gethostname() and not _process_alive(status.pid)


class Lease:
    """Holds a stage's RUNNING status and renews its heartbeat until released."""

    def __init__(self, output: str, invocation: str, lease_seconds: float):
        self.output = output
        self.lease_seconds = lease_seconds
        self.status = Status(RUNNING, invocation)
        self.previous: Status | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease-renewer")

    def acquire(self) -> Lease:
        current = read_status(self.output)
        # A first status is created create-only, so two runners starting on a fresh output
        # cannot both believe they hold it.
        if current is None and not storage.write_if_absent(
            status_uri(self.output), _encode(self.status)
        ):
            current = read_status(self.output)
        if current is not None:
            if current.state == RUNNING and not is_stale(current, self.lease_seconds):
                age = time.time() - current.heartbeat
                raise StageBusy(
                    f"{self.output} is being produced by pid {current.pid} on {current.host} "
                    f"(lease renewed {age:.0f}s ago); rerun when it ends or its lease expires"
                )
            write_status(self.output, self.status)
        self.previous = current
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            self.status.heartbeat = time.time()
            write_status(self.output, self.status)

    def update(self, **fields: Any) -> None:
        """Change fields of the held status and write it now."""
        for key, value in fields.items():
            setattr(self.status, key, value)
        write_status(self.output, self.status)

    def release(self, state: str, **updates: Any) -> None:
        """Stop renewing and write the final state."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.update(state=state, finished=time.time(), **updates)
