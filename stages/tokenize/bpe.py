"""Making the tokenize stage's tokenizers.

- GPT-2's byte-level BPE (``load_gpt2``): its ranks come from a tiktoken ranks file (path or
  URL), tiktoken's registry (``gpt2``, when the machine can reach it) or a Hugging Face
  ``tokenizer.json`` of a GPT-2-style BPE; it is saved as the ranks, for tiktoken, and a
  ``tokenizer.json`` derived from them (``hf_files``).
- A byte-level BPE trained with Hugging Face ``tokenizers`` on a corpus (``train_bpe``).

Either is returned as a ``Tokenizer`` (``tokenizer``: its files, its engine, and
``load_tokenizer`` for the saved copy).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import requests
import tiktoken
from tokenizers import AddedToken, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from pipeline import storage
from stages.tokenize.hf_files import (
    byte_level,
    descriptor,
    hf_from_ranks,
    hf_side_files,
    ranks_from_hf,
)
from stages.tokenize.tokenizer import (
    DESCRIPTOR,
    EOS,
    GPT2_EOS_ID,
    GPT2_PATTERN,
    HF_TOKENIZER,
    RANKS,
    Tokenizer,
    TokenizerError,
    parse_ranks,
    ranks_file,
)


def gpt2_from_ranks(ranks: dict[bytes, int], model_max_length: int = 2048) -> Tokenizer:
    """GPT-2's tokenizer from its 50256 mergeable ranks (EOS is added as 50256)."""
    if len(ranks) != GPT2_EOS_ID or sorted(ranks.values()) != list(range(GPT2_EOS_ID)):
        raise TokenizerError(f"GPT-2 needs ranks 0..{GPT2_EOS_ID - 1}, got {len(ranks)} ranks")
    files = {
        RANKS: ranks_file(ranks),
        HF_TOKENIZER: hf_from_ranks(ranks).to_str(pretty=False).encode(),
        DESCRIPTOR: descriptor(
            kind="gpt2",
            engine="tiktoken",
            pattern=GPT2_PATTERN,
            special_tokens={EOS: GPT2_EOS_ID},
            eos=EOS,
            eos_id=GPT2_EOS_ID,
            vocab_size=GPT2_EOS_ID + 1,
        ),
        **hf_side_files(EOS, model_max_length),
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
    ranks = ranks_from_hf(data, source) if is_json else parse_ranks(data, source)
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
    hf = byte_level(HFTokenizer(models.BPE()))
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
        DESCRIPTOR: descriptor(
            kind="train",
            engine="hf",
            eos=eos,
            eos_id=hf.token_to_id(eos),
            vocab_size=hf.get_vocab_size(with_added_tokens=True),
        ),
        **hf_side_files(eos, model_max_length),
    }
    return Tokenizer.from_files(files, "trained BPE")
