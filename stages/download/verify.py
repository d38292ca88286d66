"""Checks that a downloaded file is what a Pile mirror publishes, as its bytes stream past:
complete zstd frames and a Pile JSON first line."""

from __future__ import annotations

import json

import zstandard

from stages.download.config import DownloadError

# A Pile document can be long, but a first line beyond this is not a Pile file.
MAX_FIRST_LINE_BYTES = 64 * 2**20
# Compressed bytes handed to the zstd decoder at a time, so one call's output stays small.
ZSTD_FEED_BYTES = 256 * 2**10


class PileCheck:
    """Checks a file as its bytes stream past: complete zstd frames (``.zst``) and a Pile
    JSON first line (``.jsonl`` / ``.jsonl.zst``), without holding the file in memory.

    The first problem is kept rather than raised, so that the download still finishes and a
    checksum mismatch (a bad transfer, worth fetching again) can take precedence over it."""

    def __init__(self, name: str):
        self.name = name
        self.problem: str | None = None
        self._zstd = name.endswith(".zst")
        self._jsonl = name.removesuffix(".zst").endswith(".jsonl")
        self._decoder = zstandard.ZstdDecompressor()
        self._frame = self._decoder.decompressobj()
        self._in_frame = False
        self._first_line: bytearray | None = bytearray() if self._jsonl else None

    @staticmethod
    def applies_to(name: str) -> bool:
        return name.endswith((".zst", ".jsonl"))

    def feed(self, data: bytes) -> None:
        if self.problem is not None:
            return
        if not self._zstd:
            self._take(data)
            return
        for start in range(0, len(data), ZSTD_FEED_BYTES):
            self._decode(data[start : start + ZSTD_FEED_BYTES])

    def _decode(self, data: bytes) -> None:
        # One decompressobj decodes one frame; a file may hold several frames in a row.
        while data and self.problem is None:
            try:
                self._take(self._frame.decompress(data))
            except zstandard.ZstdError as exc:
                self.problem = f"not valid zstd ({exc})"
                return
            if not self._frame.eof:
                self._in_frame = True
                return
            data = self._frame.unused_data
            self._frame = self._decoder.decompressobj()
            self._in_frame = False

    def _take(self, text: bytes) -> None:
        if self._first_line is None or not text:
            return
        line, newline, _ = text.partition(b"\n")
        self._first_line += line
        if newline:
            self._check_first_line()
        elif len(self._first_line) > MAX_FIRST_LINE_BYTES:
            self.problem = f"first line is over {MAX_FIRST_LINE_BYTES} bytes"

    def _check_first_line(self) -> None:
        line, self._first_line = bytes(self._first_line or b""), None
        try:
            doc = json.loads(line)
        except ValueError as exc:
            self.problem = f"first line is not Pile JSON ({exc})"
            return
        if not (
            isinstance(doc, dict)
            and isinstance(doc.get("text"), str)
            and isinstance(meta := doc.get("meta"), dict)
            and isinstance(meta.get("pile_set_name"), str)
        ):
            self.problem = (
                'first line is not Pile JSON (needs {"text": str, "meta": {"pile_set_name": str}})'
            )

    def finish(self) -> None:
        """Raise, naming the file, unless all of it was well-formed."""
        if self.problem is None and self._in_frame:
            self.problem = "not valid zstd (truncated frame)"
        if self.problem is None and self._first_line is not None:
            if self._first_line:
                self._check_first_line()
            else:
                self.problem = "empty, no Pile JSON line"
        if self.problem is not None:
            raise DownloadError(f"{self.name}: {self.problem}")
