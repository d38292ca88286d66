"""Streaming decompression of ``.zst`` and ``.gz`` files, fed in pieces of any size.

A file may hold several zstd frames or gzip members in a row (as parallel compressors and
``cat`` write them); each is decoded from its start, one after another. Input is handed to
the decoder in slices of ``FEED_BYTES`` so that the output of one call stays small. Both the
dedup reader and the download stage's check decode this way.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import zstandard

FEED_BYTES = 256 * 2**10
"""Compressed bytes handed to the decoder per call."""

_KINDS: dict[str, tuple[str, Callable[[], Any], type[Exception]]] = {
    ".zst": ("zstd", lambda: zstandard.ZstdDecompressor().decompressobj(), zstandard.ZstdError),
    # wbits 31: the gzip container.
    ".gz": ("gzip", lambda: zlib.decompressobj(wbits=31), zlib.error),
}


class CorruptStream(Exception):
    """The compressed bytes cannot be decoded; the message says why."""


class Decompressor:
    """Decodes one compressed file fed in pieces, frame after frame."""

    def __init__(self, suffix: str):
        self.kind, self._new, self._error = _KINDS[suffix]
        self._frame = self._new()
        self.in_frame = False
        """Whether the bytes so far end inside a frame (a truncated file, if nothing follows)."""
        self.consumed = 0
        """Compressed bytes decoded so far."""

    @staticmethod
    def for_file(name: str) -> Decompressor | None:
        """The decompressor of file ``name`` by its suffix; None for an uncompressed file."""
        suffix = name[name.rfind(".") :]
        return Decompressor(suffix) if suffix in _KINDS else None

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``data``; raises ``CorruptStream``."""
        for start in range(0, len(data), FEED_BYTES):
            piece = data[start : start + FEED_BYTES]
            while piece:
                try:
                    out = self._frame.decompress(piece)
                except self._error as exc:
                    raise CorruptStream(
                        f"corrupt {self.kind} data near compressed byte {self.consumed}: {exc}"
                    ) from None
                if out:
                    yield out
                if not self._frame.eof:
                    self.in_frame = True
                    break
                # A frame ended inside this piece: the rest starts the next frame.
                piece = self._frame.unused_data
                self._frame = self._new()
                self.in_frame = False
            self.consumed += len(data[start : start + FEED_BYTES])

    def check_complete(self) -> None:
        """Raise ``CorruptStream`` if the bytes fed end inside a frame."""
        if self.in_frame:
            raise CorruptStream(
                f"truncated {self.kind} stream, ends inside a frame at byte {self.consumed}"
            )
