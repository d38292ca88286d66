"""The tokenizers of the tokenize stage, saved with its output and reloaded exactly.

Two kinds, two engines:

- GPT-2's byte-level BPE runs on tiktoken (the fastest exact GPT-2 encoder). Its ranks come
  from a tiktoken ranks file (path or URL), tiktoken's registry (``gpt2``, when the machine
  can reach it) or a Hugging Face ``tokenizer.json`` of a GPT-2-style BPE. A Hugging Face
  copy is derived from the ranks (every split of a token into two tokens becomes a merge,
  ordered by the token's rank: tiktoken's merge rule written as a merge list).
- A byte-level BPE trained with Hugging Face ``tokenizers`` runs on that library.

Either way the tokenizer is a handful of files (``Tokenizer.files``); the stage saves them
and every later user loads them with ``load_tokenizer``, so the data, the model and the
evaluation share one tokenizer. ``meshline_tokenizer.json`` says which engine reads them.

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
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import requests
import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (HF byte-level vocab)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


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


def _ranks_file(ranks: dict[bytes, int]) -> bytes:
    lines = (
        f"{base64.b64encode(t).decode()} {r}"
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    return ("\n".join(lines) + "\n").encode()


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first;
    as a merge list that is every two-token split of every token, by the token's rank."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        valid = sorted(
            ((a, b) for a, b in splits if a in ranks and b in ranks),
            key=lambda ab: (ranks[ab[0]], ranks[ab[1]]),
        )
        merges.extend((_token_str(a), _token_str(b)) for a, b in valid)
    return merges


def _byte_level(tokenizer: HFTokenizer) -> HFTokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _hf_side_files(eos: str, model_max_length: int) -> dict[str, bytes]:
    """tokenizer_config.json and special_tokens_map.json for ``AutoTokenizer``."""
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        # The data encodes special-token strings inside documents as text; so must users.
        "split_special_tokens": True,
    }
    return {
        HF_CONFIG: json.dumps(config, indent=1, sort_keys=True).encode(),
        HF_SPECIAL: json.dumps(special, indent=1, sort_keys=True).encode(),
    }


def _descriptor(**fields: object) -> bytes:
    return json.dumps(fields, indent=1, sort_keys=True).encode()


def gpt2_from_ranks(ranks: dict[bytes, int], model_max_length: int = 2048) -> Tokenizer:
    """GPT-2's tokenizer from its 50256 mergeable ranks (EOS is added as 50256)."""
    if len(ranks) != GPT2_EOS_ID or sorted(ranks.values()) != list(range(GPT2_EOS_ID)):
        raise TokenizerError(f"GPT-2 needs ranks 0..{GPT2_EOS_ID - 1}, got {len(ranks)} ranks")
    hf = HFTokenizer(
        models.BPE(
            vocab={_token_str(t): r for t, r in ranks.items()}, merges=_merges_from_ranks(ranks)
        )
    )
    _byte_level(hf).add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    files = {
        RANKS: _ranks_file(ranks),
        HF_TOKENIZER: hf.to_str(pretty=False).encode(),
        DESCRIPTOR: _descriptor(
            kind="gpt2",
            engine="tiktoken",
            pattern=GPT2_PATTERN,
            special_tokens={EOS: GPT2_EOS_ID},
            eos=EOS,
            eos_id=GPT2_EOS_ID,
            vocab_size=GPT2_EOS_ID + 1,
        ),
        **_hf_side_files(EOS, model_max_length),
    }
    return Tokenizer.from_files(files, "gpt2")


def _read_source(source: str) -> bytes:
    if source.startswith(("http://", "https://")):
        response = requests.get(source, timeout=60)
        if response.status_code != 200:
            raise TokenizerError(f"{source}: HTTP {response.status_code}")
        return response.content
    try:
        return storage.read_bytes(source)
    except OSError as exc:
        raise TokenizerError(f"{source}: {exc}") from None


def _ranks_from_hf(data: bytes, where: str) -> dict[bytes, int]:
    """The ranks of a GPT-2-style HF tokenizer.json (byte-level BPE, ids = ranks)."""
    try:
        spec = json.loads(data)
        vocab = spec["model"]["vocab"]
        if spec["model"]["type"] != "BPE":
            raise TokenizerError(f"{where}: model is {spec['model']['type']}, not BPE")
        return {bytes(_CHAR_TO_BYTE[c] for c in token): rank for token, rank in vocab.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"{where}: not a byte-level BPE tokenizer.json ({exc!r})") from None


def load_gpt2(source: str, sha256: str | None = None, model_max_length: int = 2048) -> Tokenizer:
    """GPT-2's tokenizer from a ranks file (path or URL), a HF ``tokenizer.json`` (or a
    directory holding one), or tiktoken's registry name ``gpt2``. ``sha256`` checks the
    file read."""
    if source == "gpt2":
        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # tiktoken raises whatever its download raised
            raise TokenizerError(
                f"tiktoken registry 'gpt2' unreachable ({exc!r}); give a ranks file"
            ) from None
        return gpt2_from_ranks(encoding._mergeable_ranks, model_max_length)
    if not storage.is_gcs(source) and "://" not in source and os.path.isdir(source):
        source = os.path.join(source, HF_TOKENIZER)
    data = _read_source(source)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise TokenizerError(
            f"{source}: sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256}"
        )
    is_json = data.lstrip()[:1] == b"{"
    ranks = _ranks_from_hf(data, source) if is_json else parse_ranks(data, source)
    ranks = {t: r for t, r in ranks.items() if r < GPT2_EOS_ID}
    tokenizer = gpt2_from_ranks(ranks, model_max_length)
    if is_json:
        _check_same_ids(tokenizer, HFTokenizer.from_str(data.decode("utf-8")), source)
    return tokenizer


# Text that exercises contractions, numbers, punctuation runs, whitespace runs and bytes.
_PROBE = "It's 2049 tokens!  Ünïcödé — 日本語 🎉\n\n\tdef f(x):  return x**2  # ok?\r\n" * 4


def _check_same_ids(tokenizer: Tokenizer, hf: HFTokenizer, where: str) -> None:
    ours = tokenizer.encode(_PROBE)
    theirs = hf.encode(_PROBE, add_special_tokens=False).ids
    if ours != theirs:
        raise TokenizerError(
            f"{where}: not GPT-2's BPE (its ids differ from the ranks' on a probe)"
        )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOS,),
    whitespace_tokens: int = 0,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> Tokenizer:
    """A byte-level BPE with GPT-2's split pattern trained on ``texts``. The first special
    token is EOS. ``whitespace_tokens`` adds runs of 2, 3, ... spaces as tokens (as GPT-NeoX
    did); ``vocab_size`` counts every id, these included."""
    if not special_tokens:
        raise TokenizerError("a trained tokenizer needs at least one special token (EOS)")
    merged_size = vocab_size - whitespace_tokens
    minimum = 256 + len(special_tokens)
    if merged_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size} leaves fewer than {minimum} BPE ids")
    hf = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=merged_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    hf.add_tokens([AddedToken(" " * n, normalized=False) for n in range(2, whitespace_tokens + 2)])
    eos = special_tokens[0]
    files = {
        HF_TOKENIZER: hf.to_str(pretty=False).encode(),
        DESCRIPTOR: _descriptor(
            kind="train",
            engine="hf",
            eos=eos,
            eos_id=hf.token_to_id(eos),
            vocab_size=hf.get_vocab_size(with_added_tokens=True),
        ),
        **_hf_side_files(eos, model_max_length),
    }
    return Tokenizer.from_files(files, "trained BPE")


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
