"""The Hugging Face side of a byte-level BPE: its ``tokenizer.json`` made from tiktoken ranks
(every split of a token into two tokens becomes a merge, ordered by the token's rank:
tiktoken's merge rule written as a merge list), the files ``AutoTokenizer`` reads beside
it, meshline's descriptor, and GPT-2-style ranks read back out of a ``tokenizer.json``."""

from __future__ import annotations

import json

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from stages.tokenize.tokenizer import EOS, HF_CONFIG, HF_SPECIAL, TokenizerError


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


def byte_level(tokenizer: HFTokenizer) -> HFTokenizer:
    """``tokenizer`` with GPT-2's byte-level pre-tokenizer, decoder and post-processor."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def hf_from_ranks(ranks: dict[bytes, int]) -> HFTokenizer:
    """The byte-level HF BPE that gives the ids tiktoken gives with ``ranks``, EOS added."""
    hf = HFTokenizer(
        models.BPE(
            vocab={_token_str(t): r for t, r in ranks.items()}, merges=_merges_from_ranks(ranks)
        )
    )
    byte_level(hf).add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return hf


def ranks_from_hf(data: bytes, where: str) -> dict[bytes, int]:
    """The ranks of a GPT-2-style HF tokenizer.json (byte-level BPE, ids = ranks)."""
    try:
        spec = json.loads(data)
        vocab = spec["model"]["vocab"]
        if spec["model"]["type"] != "BPE":
            raise TokenizerError(f"{where}: model is {spec['model']['type']}, not BPE")
        return {bytes(_CHAR_TO_BYTE[c] for c in token): rank for token, rank in vocab.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"{where}: not a byte-level BPE tokenizer.json ({exc!r})") from None


def hf_side_files(eos: str, model_max_length: int) -> dict[str, bytes]:
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


def descriptor(**fields: object) -> bytes:
    """``meshline_tokenizer.json``: which engine reads the files, the kind and special ids."""
    return json.dumps(fields, indent=1, sort_keys=True).encode()
