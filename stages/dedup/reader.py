"""Streaming reader of Pile-format ``.jsonl.zst`` / ``.jsonl`` files.

Ray Data's JSON reader loads a whole file per read task, and a Pile shard is ~27 GiB
uncompressed, so this reader streams: compressed bytes are read in chunks and fed to a
zstd decoder in small slices (a file may hold several frames in a row), lines are cut
from the decoded stream, and only the current line is ever held whole (a single 50 MB
document is one line). ``iter_lines`` can start at any line: lines before it are only
counted, never parsed, so a resumed task skips finished work cheaply.

A zstd frame can only be decoded from its start, so one reader streams each file; the
stage cuts that stream into line-range units that every later phase processes in
parallel. ``parse_line`` turns one line into a document or a ``Malformed`` reason (bad
JSON, invalid UTF-8, a missing or mistyped field) so callers can count and skip it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from pipeline import storage

# Compressed bytes read from storage at a time.
READ_BYTES = 4 * 2**20
# Compressed bytes handed to the zstd decoder per call, so one call's output stays small.
FEED_BYTES = 256 * 2**10


class ReadError(Exception):
    """A file cannot be read (corrupt or truncated zstd); the message names file and offset."""


class MalformedLine(Exception):
    """A malformed line under ``strict``; the message names file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    pile_set_name: str


@dataclass(frozen=True)
class Malformed:
    reason: str


def _decoded_chunks(uri: str, name: str) -> Iterator[bytes]:
    """The decompressed bytes of ``uri`` (plain bytes unless it ends in ``.zst``)."""
    with storage.open_file(uri, "rb") as f:
        if not name.endswith(".zst"):
            while chunk := f.read(READ_BYTES):
                yield chunk
            return
        decoder = zstandard.ZstdDecompressor()
        frame = decoder.decompressobj()
        in_frame = False
        offset = 0
        while chunk := f.read(READ_BYTES):
            for start in range(0, len(chunk), FEED_BYTES):
                data = chunk[start : start + FEED_BYTES]
                while data:
                    try:
                        out = frame.decompress(data)
                    except zstandard.ZstdError as exc:
                        raise ReadError(
                            f"{name}: corrupt zstd data near compressed byte {offset}: {exc}"
                        ) from None
                    if out:
                        yield out
                    if not frame.eof:
                        in_frame = True
                        break
                    # A frame ended inside this slice: the rest starts the next frame.
                    data = frame.unused_data
                    frame = decoder.decompressobj()
                    in_frame = False
                offset += len(chunk[start : start + FEED_BYTES])
        if in_frame:
            raise ReadError(f"{name}: truncated zstd stream, ends inside a frame at byte {offset}")


def iter_lines(uri: str, name: str, start_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, line bytes without newline)`` for every line from
    ``start_line`` on. Earlier lines are counted, not returned. A final line without a
    newline counts; an empty file has no lines."""
    line_no = 1
    pending: list[bytes] = []
    for chunk in _decoded_chunks(uri, name):
        if line_no + chunk.count(b"\n") < start_line:
            line_no += chunk.count(b"\n")
            pending.clear()
            continue
        pos = 0
        while (end := chunk.find(b"\n", pos)) >= 0:
            if line_no >= start_line:
                pending.append(chunk[pos:end])
                yield line_no, b"".join(pending)
            pending.clear()
            line_no += 1
            pos = end + 1
        if pos < len(chunk):
            pending.append(chunk[pos:])
    if pending and line_no >= start_line:
        yield line_no, b"".join(pending)


def parse_line(line: bytes) -> Document | Malformed:
    """One Pile line as a document, or why it is malformed."""
    try:
        raw = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Malformed(f"invalid UTF-8 at byte {exc.start}")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return Malformed(f"not JSON ({exc})")
    if not isinstance(doc, dict):
        return Malformed("not a JSON object")
    text = doc.get("text")
    if not isinstance(text, str):
        return Malformed("missing text" if text is None else "text is not a string")
    meta = doc.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        return Malformed("meta.pile_set_name missing or not a string")
    try:
        # JSON may escape lone surrogates, which no UTF-8 output (Parquet) can hold.
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Malformed("text holds a lone surrogate (not valid Unicode)")
    return Document(text, name)
