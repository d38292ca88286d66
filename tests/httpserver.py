"""A real HTTP file server on 127.0.0.1 that misbehaves on request, for download tests.

It serves one directory, honours ``Range: bytes=N-``, records every request, and can be told
per path to drop the connection part-way, answer 500 a few times, ignore Range, or serve
wrong bytes, the way flaky mirrors do.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Misbehaviour:
    """What the server does wrong; each count is used up one request at a time."""

    drop_after: dict[str, int] = field(default_factory=dict)
    """Path -> bytes sent before the connection is cut, on the first request only."""
    errors: Counter[str] = field(default_factory=Counter)
    """Path -> how many requests get HTTP 500 before one succeeds."""
    wrong_bytes: Counter[str] = field(default_factory=Counter)
    """Path -> how many requests get the right length of wrong bytes."""
    ignore_range: set[str] = field(default_factory=set)
    """Paths answered with the whole file (200) even when a Range is asked for."""
    require_auth: str | None = None
    """An ``Authorization`` header value every request must carry (else 401)."""
    bytes_per_second: float | None = None
    """Send bodies no faster than this, like a slow mirror (leaves time to kill a run)."""


@dataclass
class Request:
    path: str
    """The URL path, without the query string."""
    query: str
    range: str | None
    status: int
    authorization: str | None
    """The ``Authorization`` header it came with."""


class FileServer:
    """Serves ``root`` on ``http://127.0.0.1:<port>`` in a background thread."""

    def __init__(self, root: str):
        self.root = root
        self.misbehave = Misbehaviour()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def hits(self, path: str) -> int:
        """Requests for ``path`` (e.g. ``/train/00.jsonl.zst``) so far."""
        return sum(1 for r in self.requests if r.path == path)

    def data_hits(self) -> int:
        """Requests for anything but the checksum file."""
        return sum(1 for r in self.requests if not r.path.endswith("SHA256SUMS.txt"))

    def _take(self, counter: Counter[str], path: str) -> bool:
        with self._lock:
            if counter[path] <= 0:
                return False
            counter[path] -= 1
            return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the tests read ``server.requests`` instead."""

            def _record(self, path: str, query: str, status: int) -> None:
                with server._lock:
                    server.requests.append(
                        Request(
                            path,
                            query,
                            self.headers.get("Range"),
                            status,
                            self.headers.get("Authorization"),
                        )
                    )

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                status = self._status(path)
                self._record(path, parts.query, status)
                if status != 200:
                    self.send_error(status)
                    return
                with open(os.path.join(server.root, path.lstrip("/")), "rb") as f:
                    data = f.read()
                if server._take(server.misbehave.wrong_bytes, path):
                    data = bytes(b ^ 0xFF for b in data)
                start = self._range_start(path)
                if start is None:
                    self.send_response(200)
                else:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    data = data[start:]
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with server._lock:
                    cut = server.misbehave.drop_after.pop(path, None)
                if cut is None:
                    self._send_paced(data)
                    return
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            def _send_paced(self, data: bytes) -> None:
                rate = server.misbehave.bytes_per_second
                piece = 64 * 1024 if rate else max(1, len(data))
                for start in range(0, len(data), piece):
                    self.wfile.write(data[start : start + piece])
                    if rate:
                        time.sleep(piece / rate)

            def _status(self, path: str) -> int:
                wanted = server.misbehave.require_auth
                if wanted is not None and self.headers.get("Authorization") != wanted:
                    return 401
                if not os.path.isfile(os.path.join(server.root, path.lstrip("/"))):
                    return 404
                if server._take(server.misbehave.errors, path):
                    return 500
                return 200

            def _range_start(self, path: str) -> int | None:
                header = self.headers.get("Range")
                if not header or path in server.misbehave.ignore_range:
                    return None
                return int(header.removeprefix("bytes=").partition("-")[0])

        return Handler

    @contextmanager
    def running(self) -> Iterator[FileServer]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()
