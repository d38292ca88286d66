"""The tokenize stage with ``source: gpt2`` (tiktoken's registry), offline.

tiktoken builds ``gpt2`` from OpenAI's ``vocab.bpe`` and ``encoder.json``, fetched by URL and
cached under ``TIKTOKEN_CACHE_DIR`` as the sha1 of the URL, and it checks their sha256 against
constants in ``tiktoken_ext.openai_public``. This machine cannot reach the URLs, so the test
regenerates both files from the ranks openai-whisper ships (``whisper/assets/gpt2.tiktoken``):
the merges are recovered by replaying BPE on each token with the ranks below it. The result is
byte-identical to OpenAI's files (tiktoken's hash check passes), the cache is seeded with them,
and every proxy points at a closed port so that any download attempt fails instead of
reaching the network. The registry tokenizer must then give the same ids and the same stage
output bytes as the ranks-file source."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re

import pytest
import tiktoken
import tiktoken.registry
import tiktoken_ext.openai_public

from pipeline.ledger import Ledger
from pipeline.stage import StageContext, Upstream
from stages.tokenize import TokenizeConfig, run
from stages.tokenize.bpe import load_gpt2
from stages.tokenize.tokenizer import TokenizerError
from tests.autoscaling import free_port
from tests.tokenize_data import ADVERSARIAL, gpt2_ranks_path, stdlib_texts, write_part

VOCAB_BPE, ENCODER_JSON = "vocab_bpe", "encoder_json"


def whisper_ranks() -> dict[bytes, int]:
    ranks = {}
    with open(gpt2_ranks_path(), "rb") as f:
        for line in f.read().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def data_gym_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the inverse of tiktoken's decoder)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + n) for n, b in enumerate(others)})
    return alphabet


def merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged into ``token``: byte-level BPE on it with only lower ranks."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(
            (ranks[a + b], i)
            for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
            if ranks.get(a + b, rank) < rank
        )
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def openai_files(ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """``vocab.bpe`` and ``encoder.json`` as OpenAI published them for GPT-2."""
    alphabet = data_gym_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    ordered = sorted(ranks, key=ranks.__getitem__)
    merges = [merge_of(t, ranks[t], ranks) for t in ordered[256:]]
    vocab_bpe = "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges)
    encoder = {text(t): ranks[t] for t in ordered}
    encoder["<|endoftext|>"] = 50256
    return vocab_bpe.encode(), json.dumps(encoder).encode()


def registry_sources() -> dict[str, tuple[str, str]]:
    """The URL and expected sha256 of each file, read from tiktoken's own gpt2 constructor,
    so a tiktoken release that moves them makes this test say so."""
    source = inspect.getsource(tiktoken_ext.openai_public.gpt2)
    found = {}
    for name in (VOCAB_BPE, ENCODER_JSON):
        url = re.search(rf'{name}_file="([^"]+)"', source)
        digest = re.search(rf'{name}_hash="([0-9a-f]{{64}})"', source)
        assert url and digest, f"tiktoken's gpt2() no longer names {name}_file/{name}_hash"
        found[name] = (url.group(1), digest.group(1))
    return found


@pytest.fixture(scope="module")
def registry_cache(tmp_path_factory) -> str:
    """A TIKTOKEN_CACHE_DIR holding both files under tiktoken's cache keys."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    vocab_bpe, encoder_json = openai_files(whisper_ranks())
    for name, data in ((VOCAB_BPE, vocab_bpe), (ENCODER_JSON, encoder_json)):
        url, expected = registry_sources()[name]
        assert hashlib.sha256(data).hexdigest() == expected, f"{name} differs from OpenAI's"
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    return str(cache)


@pytest.fixture
def offline(monkeypatch) -> None:
    """Downloads fail fast: every proxy is a closed local port; tiktoken forgets encodings
    it built earlier in this process."""
    closed = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, closed)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


def test_registry_gpt2_from_the_seeded_cache_equals_the_ranks_file(
    registry_cache, offline, monkeypatch
):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", registry_cache)
    registry = load_gpt2("gpt2")
    ranks_file = load_gpt2(gpt2_ranks_path())
    assert registry.fingerprint == ranks_file.fingerprint
    assert registry.vocab_size == ranks_file.vocab_size == 50257
    for text in ADVERSARIAL + stdlib_texts(3):
        ids = registry.encode(text)
        assert ids == ranks_file.encode(text)
        assert ids == tiktoken.get_encoding("gpt2").encode_ordinary(text)


def test_registry_without_cache_or_network_is_a_clear_error(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="registry 'gpt2' unreachable.*give a ranks file"):
        load_gpt2("gpt2")


def run_stage(output, dedup: str, source: str) -> str:
    ctx = StageContext(
        name="tokenize",
        config=TokenizeConfig.model_validate(
            {
                "tokenizer": {"kind": "gpt2", "source": source},
                "seq_len": 63,
                "splits": ["train"],
                "workers_max": 1,
            }
        ),
        output=str(output),
        inputs={"dedup": Upstream("dedup", dedup, "fp", "digest")},
        ledger=Ledger(str(output)),
    )
    run(ctx)
    return ctx.ledger.digest()


def test_stage_with_registry_source_writes_the_ranks_file_bytes(
    ray_cluster, registry_cache, offline, monkeypatch, tmp_path
):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", registry_cache)
    dedup = tmp_path / "dedup"
    rows = [(t, "Github", f"train/00.jsonl.zst:{i + 1}") for i, t in enumerate(stdlib_texts(12))]
    rows += [(t, "Pile-CC", f"train/00.jsonl.zst:{100 + i}") for i, t in enumerate(ADVERSARIAL)]
    write_part(str(dedup / "train/part-00000.parquet"), rows)
    from_registry = run_stage(tmp_path / "registry" / "tokenize-fp", str(dedup), "gpt2")
    from_file = run_stage(tmp_path / "file" / "tokenize-fp", str(dedup), gpt2_ranks_path())
    assert from_registry == from_file
    for name in ("tokenizer/gpt2.tiktoken", "train/shard-00000.arrow"):
        registry_bytes = (tmp_path / "registry" / "tokenize-fp" / name).read_bytes()
        assert registry_bytes == (tmp_path / "file" / "tokenize-fp" / name).read_bytes(), name
