"""Tokenizers of the tokenize stage: GPT-2 ids equal tiktoken's and HF's on real and
adversarial text, saved tokenizers reload exactly (ours, HF ``tokenizers``, ``AutoTokenizer``),
chunked long-document encoding equals whole-document encoding, BPE training is deterministic."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as HFTokenizer

from stages.tokenize.bpe import load_gpt2, train_bpe
from stages.tokenize.tokenizer import GPT2_PATTERN, TokenizerError, load_tokenizer, safe_chunks
from tests.httpserver import FileServer
from tests.tokenize_data import ADVERSARIAL, gpt2_ranks_path, random_texts, stdlib_texts

EOS_AS_TEXT = [27, 91, 437, 1659, 5239, 91, 29]


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2(gpt2_ranks_path())


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's own GPT-2 encoding, built the way tiktoken_ext builds ``gpt2``."""
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(gpt2_ranks_path()),
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


@pytest.fixture(scope="module")
def saved_gpt2(gpt2, tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("gpt2") / "tokenizer")
    gpt2.save(directory)
    return directory


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_texts(40)


@pytest.fixture(scope="module")
def trained(corpus):
    return train_bpe(corpus, vocab_size=1200, whitespace_tokens=8)


def hf_loaded(directory: str) -> HFTokenizer:
    tokenizer = HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def auto_loaded(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def test_gpt2_known_ids_and_eos(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == EOS_AS_TEXT
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257
    assert gpt2.dtype == np.uint16
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_ids_equal_tiktoken_and_hf_on_real_and_adversarial_text(
    gpt2, reference, saved_gpt2, corpus
):
    texts = corpus[:10] + ADVERSARIAL + random_texts(seed=1, count=30, length=400)
    hf = hf_loaded(saved_gpt2)
    auto = auto_loaded(saved_gpt2)
    reloaded = load_tokenizer(os.path.dirname(saved_gpt2))
    assert reloaded.fingerprint == gpt2.fingerprint
    hf_ids = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    for text, theirs in zip(texts, hf_ids, strict=True):
        ours = gpt2.encode(text)
        assert ours == reference.encode_ordinary(text), text[:60]
        assert ours == theirs, text[:60]
        assert ours == auto.encode(text, add_special_tokens=False), text[:60]
        assert ours == reloaded.encode(text)
        assert gpt2.decode(ours) == text
        assert hf.decode(ours) == text
        assert auto.decode(ours) == text
        assert 50256 not in ours


def test_gpt2_from_hf_tokenizer_json_and_url_give_the_same_tokenizer(gpt2, saved_gpt2, tmp_path):
    from_json = load_gpt2(saved_gpt2)  # a directory holding tokenizer.json
    assert from_json.fingerprint == gpt2.fingerprint
    shutil.copy(gpt2_ranks_path(), tmp_path / "gpt2.tiktoken")
    with FileServer(str(tmp_path)).running() as server:
        from_url = load_gpt2(f"{server.url}/gpt2.tiktoken")
    assert from_url.fingerprint == gpt2.fingerprint
    with pytest.raises(TokenizerError, match="sha256"):
        load_gpt2(gpt2_ranks_path(), sha256="0" * 64)


def test_bad_ranks_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "broken.tiktoken"
    path.write_bytes(b"IQ== 0\nnot-a-line\n")
    with pytest.raises(TokenizerError, match=r"broken.tiktoken:2: not a tiktoken ranks line"):
        load_gpt2(str(path))
    with pytest.raises(TokenizerError, match=r"missing.tiktoken"):
        load_gpt2(str(tmp_path / "missing.tiktoken"))


def test_safe_chunks_cut_only_after_letters_or_digits():
    text = "alpha beta\tgamma  delta\n\nepsilon" * 50
    chunks = safe_chunks(text, 40)
    assert "".join(chunks) == text
    assert all(len(c) <= 40 for c in chunks)
    assert all(c[-1].isalnum() for c in chunks[:-1])
    assert all(c[0] in " \t\n" for c in chunks[1:])
    assert safe_chunks("x" * 100, 10) == ["x" * 100]  # no safe point: one chunk


@pytest.mark.parametrize("chunk_chars", [7, 64, 4096])
def test_chunked_ids_equal_whole_document_ids(gpt2, reference, trained, corpus, chunk_chars):
    long_real = "\n".join(corpus[:6])
    texts = [long_real, *ADVERSARIAL, *random_texts(seed=chunk_chars, count=20, length=3000)]
    for text in texts:
        chunked = gpt2.encode_array(text, chunk_chars=chunk_chars)
        assert chunked.tolist() == reference.encode_ordinary(text), text[:60]
        whole = trained.encode_array(text, chunk_chars=len(text) + 1)
        assert np.array_equal(trained.encode_array(text, chunk_chars=chunk_chars), whole)


def test_encode_documents_bounds_each_engine_call_and_keeps_order(gpt2, reference):
    texts = random_texts(seed=5, count=12, length=2000)
    encoded = gpt2.encode_documents(texts, chunk_chars=100, batch_chars=300)
    assert [e.tolist() for e in encoded] == [reference.encode_ordinary(t) for t in texts]


def test_trained_bpe_is_deterministic_and_reloads_exactly(trained, corpus, tmp_path):
    again = train_bpe(corpus, vocab_size=1200, whitespace_tokens=8)
    assert again.files == trained.files and again.fingerprint == trained.fingerprint
    assert trained.vocab_size == 1200 and trained.eos_id == 0 and trained.kind == "train"
    trained.save(str(tmp_path / "tokenizer"))
    reloaded = load_tokenizer(str(tmp_path))
    hf = hf_loaded(str(tmp_path / "tokenizer"))
    auto = auto_loaded(str(tmp_path / "tokenizer"))
    for text in corpus[40:] + ADVERSARIAL + random_texts(seed=2, count=20, length=300):
        ids = trained.encode(text)
        assert reloaded.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert trained.decode(ids) == text
        assert auto.decode(ids) == text
        assert trained.eos_id not in ids


def test_trained_whitespace_tokens_encode_runs_as_one_id(trained):
    run_ids = {trained.encode(" " * n)[0] for n in range(2, 10)}
    assert len(run_ids) == 8 and all(len(trained.encode(" " * n)) == 1 for n in range(2, 10))
    assert trained.encode("x" + " " * 9 + "y") == [
        *trained.encode("x"),
        trained.encode(" " * 9)[0],
        *trained.encode("y"),
    ]


def test_training_rejects_a_vocabulary_without_room(corpus):
    with pytest.raises(TokenizerError, match="fewer than 257 BPE ids"):
        train_bpe(corpus[:2], vocab_size=260, whitespace_tokens=8)
