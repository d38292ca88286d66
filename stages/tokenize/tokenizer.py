"""A tokenizer as the files that define it, the engine that reads them, and loading it back.

Two kinds, two engines:

- GPT-2's byte-level BPE runs on tiktoken (the fastest exact GPT-2 encoder), from the
  ranks file ``gpt2.tiktoken`` saved with it.
- A byte-level BPE trained with Hugging Face ``tokenizers`` runs on that library, from its
  ``tokenizer.json``.

Either way the tokenizer is a handful of files (``Tokenizer.files``, made by ``bpe``); the
stage saves them and every later user loads them with ``load_tokenizer``, so the data, the
model and the evaluation share one tokenizer. ``meshline_tokenizer.json`` says which engine
reads them.

Special tokens inside documents are text: ``<|endoftext|>`` in a document is encoded as
the characters it is made of, never as EOS (HF loaders get ``encode_special_tokens`` /
``split_special_tokens`` for the same behaviour).

Long documents are encoded in chunks cut at safe points: a position whose character is
ASCII whitespace and whose previous character is a letter or digit. Every piece of the
GPT-2 split pattern either is all whitespace or is one optional leading space followed by
no whitespace, and the pattern has no look-behind, so no piece crosses such a point and the
pieces after it are the same whether or not the text before it is present. The added
whitespace tokens of a trained BPE are whitespace runs, so they cannot cross it either.
Chunked ids therefore equal whole-document ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from pipeline import storage

EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
# GPT-2's split pattern as tiktoken writes it (the HF ByteLevel pre-tokenizer uses the same).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DESCRIPTOR = "meshline_tokenizer.json"
HF_TOKENIZER = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL = "special_tokens_map.json"
RANKS = "gpt2.tiktoken"
# Files whose bytes decide the ids; the fingerprint hashes exactly these.
_ENCODING_FILES = (HF_TOKENIZER, RANKS)
# A whitespace character right after a letter or digit: no GPT-2 pre-token crosses it.
_SAFE_SPLIT = re.compile(r"(?<=[^\W_])[ \t\n\r]")
# Window scanned backwards at a time for the last safe split point before a chunk's end.
_SPLIT_SCAN_CHARS = 4096


class TokenizerError(ValueError):
    """A tokenizer source or saved tokenizer is unusable; the message names it."""


class _Engine(Protocol):
    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _TiktokenEngine:
    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_to_numpy writes ids straight into one buffer per text (no list of Python
        # ints); with no special token allowed it is encode_ordinary: specials are text.
        return [self.encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode_bytes(list(ids)).decode("utf-8", errors="replace")


class _HFEngine:
    def __init__(self, tokenizer: HFTokenizer):
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@dataclass
class Tokenizer:
    """A tokenizer as the files that define it, with the engine that reads them."""

    files: dict[str, bytes]
    """File name -> bytes, as saved under ``{output}/tokenizer/``."""
    kind: str
    eos_id: int
    vocab_size: int
    """Number of ids (ranks, special and added tokens); every id is below it."""
    _engine: _Engine = field(repr=False)

    @classmethod
    def from_files(cls, files: dict[str, bytes], where: str = "<memory>") -> Tokenizer:
        """The tokenizer the files describe; ``where`` names them in errors."""
        try:
            descriptor = json.loads(files[DESCRIPTOR])
            engine_name = descriptor["engine"]
            if engine_name == "tiktoken":
                engine: _Engine = _TiktokenEngine(_tiktoken_encoding(files[RANKS], descriptor))
            elif engine_name == "hf":
                engine = _HFEngine(HFTokenizer.from_str(files[HF_TOKENIZER].decode("utf-8")))
            else:
                raise TokenizerError(f"{where}: unknown engine {engine_name!r}")
            return cls(
                files, descriptor["kind"], descriptor["eos_id"], descriptor["vocab_size"], engine
            )
        except KeyError as exc:
            raise TokenizerError(f"{where}: missing {exc.args[0]}") from None

    @property
    def fingerprint(self) -> str:
        """sha256 over the files that decide the ids (tokenizer.json and any ranks file)."""
        digest = hashlib.sha256()
        for name in _ENCODING_FILES:
            if name in self.files:
                digest.update(f"{name}\0{hashlib.sha256(self.files[name]).hexdigest()}\0".encode())
        return digest.hexdigest()

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id: uint16 up to 65536 ids."""
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, special-token strings encoded as text."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, chunk_chars: int = 1 << 20) -> np.ndarray:
        """Ids of ``text`` in ``dtype``, encoded in chunks of about ``chunk_chars``."""
        return self.encode_documents([text], chunk_chars)[0]

    def encode_documents(
        self, texts: Sequence[str], chunk_chars: int = 1 << 20, batch_chars: int = 1 << 22
    ) -> list[np.ndarray]:
        """Ids of each text in ``dtype``. Long texts are cut at safe points into chunks of
        about ``chunk_chars``; the engine gets at most ``batch_chars`` characters per call,
        so memory stays bounded whatever a single document's size."""
        pieces: list[tuple[int, str]] = []
        for index, text in enumerate(texts):
            pieces.extend((index, chunk) for chunk in safe_chunks(text, chunk_chars))
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        start = 0
        while start < len(pieces):
            stop, size = start, 0
            while stop < len(pieces) and (
                stop == start or size + len(pieces[stop][1]) <= batch_chars
            ):
                size += len(pieces[stop][1])
                stop += 1
            batch = pieces[start:stop]
            for (index, _), ids in zip(
                batch, self._engine.encode_many([p for _, p in batch]), strict=True
            ):
                parts[index].append(ids.astype(self.dtype, copy=False))
            start = stop
        return [_concat(p, self.dtype) for p in parts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._engine.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        """Write every file under ``directory`` (local or ``gs://``)."""
        for name, data in sorted(self.files.items()):
            storage.write_atomic(storage.join(directory, name), data)


def _concat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def safe_chunks(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut at safe split points (see the module docstring) into chunks of at most
    ``chunk_chars`` characters, unless a stretch without any safe point is longer."""
    if len(text) <= chunk_chars:
        return [text]
    chunks = []
    start = 0
    while len(text) - start > chunk_chars:
        cut = _last_safe_point(text, start + 1, start + chunk_chars)
        if cut is None:
            match = _SAFE_SPLIT.search(text, start + chunk_chars)
            if match is None:
                break
            cut = match.start()
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def _last_safe_point(text: str, lowest: int, highest: int) -> int | None:
    """The last safe split point in ``[lowest, highest]``, scanning backwards by windows."""
    end = highest + 1
    while end > lowest:
        begin = max(lowest, end - _SPLIT_SCAN_CHARS)
        matches = list(_SAFE_SPLIT.finditer(text, begin, end))
        if matches:
            return matches[-1].start()
        end = begin
    return None


def _tiktoken_encoding(ranks_file: bytes, descriptor: dict) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        "meshline-" + descriptor["kind"],
        pat_str=descriptor["pattern"],
        mergeable_ranks=parse_ranks(ranks_file, RANKS),
        special_tokens=descriptor["special_tokens"],
        explicit_n_vocab=descriptor["vocab_size"],
    )


def parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """A tiktoken ranks file (``base64-token rank`` lines) as token -> rank."""
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise TokenizerError(f"{where}:{number}: not a tiktoken ranks line ({exc})") from None
    return ranks


def ranks_file(ranks: dict[bytes, int]) -> bytes:
    """``ranks`` as a tiktoken ranks file, by rank (what ``parse_ranks`` reads)."""
    lines = (
        f"{base64.b64encode(t).decode()} {r}"
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    return ("\n".join(lines) + "\n").encode()


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer saved by the tokenize stage: ``path`` is its output directory (local or
    ``gs://``) or the ``tokenizer/`` directory in it."""
    directory = path
    if not storage.exists(storage.join(directory, DESCRIPTOR)):
        directory = storage.join(path, "tokenizer")
    if not storage.exists(storage.join(directory, DESCRIPTOR)):
        raise TokenizerError(f"{path}: no {DESCRIPTOR} here or under tokenizer/")
    files = {}
    for uri in storage.list_files(directory):
        name = uri.rsplit("/", 1)[-1]
        files[name] = storage.read_bytes(uri)
    return Tokenizer.from_files(files, directory)
