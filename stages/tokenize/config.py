"""The tokenize stage's config: which tokenizer (GPT-2's or a trained BPE), how rows are
packed, the mixture of components, and how many encoding workers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline.stage import StageConfig
from stages.tokenize.tokenizer import EOS

# Component epochs of the Pile (REFERENCE.md section 5), for ``mixture: pile``.
PILE_EPOCHS = {
    "Pile-CC": 1.0,
    "PubMed Central": 2.0,
    "Books3": 1.5,
    "OpenWebText2": 2.0,
    "ArXiv": 2.0,
    "Github": 1.0,
    "FreeLaw": 1.5,
    "StackExchange": 2.0,
    "USPTO Backgrounds": 2.0,
    "PubMed Abstracts": 2.0,
    "Gutenberg (PG-19)": 2.5,
    "OpenSubtitles": 1.5,
    "Wikipedia (en)": 3.0,
    "DM Mathematics": 2.0,
    "Ubuntu IRC": 2.0,
    "BookCorpus2": 1.5,
    "EuroParl": 2.0,
    "HackerNews": 2.0,
    "YoutubeSubtitles": 2.0,
    "PhilPapers": 2.0,
    "NIH ExPorter": 2.0,
    "Enron Emails": 2.0,
}


class Gpt2TokenizerConfig(StageConfig):
    """GPT-2's byte-level BPE (50257 ids, EOS ``<|endoftext|>`` = 50256)."""

    kind: Literal["gpt2"] = "gpt2"
    """GPT-2's tokenizer, encoded with tiktoken."""
    source: str = "gpt2"
    """A tiktoken ranks file (path, ``gs://`` or ``http(s)://`` URL, e.g. openai-whisper's
    ``whisper/assets/gpt2.tiktoken``), a Hugging Face ``tokenizer.json`` or a directory holding
    one, or ``gpt2`` for tiktoken's registry (needs its download site or cache)."""
    sha256: str | None = None
    """Expected sha256 of the file ``source`` names."""


class TrainedTokenizerConfig(StageConfig):
    """A byte-level BPE trained on dedup's train split, as GPT-NeoX trained its own."""

    kind: Literal["train"] = "train"
    """Train a byte-level BPE with Hugging Face ``tokenizers`` (GPT-2's split pattern)."""
    vocab_size: int = Field(default=50257, ge=260)
    """Every id: 256 bytes, special tokens, whitespace tokens and learned merges."""
    special_tokens: list[str] = Field(default=[EOS], min_length=1)
    """Special tokens (ids from 0); the first is EOS, appended after every document."""
    whitespace_tokens: int = Field(default=0, ge=0)
    """Add runs of 2, 3, ... spaces as this many extra tokens (GPT-NeoX's code-friendly
    whitespace tokens)."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair is merged only if it occurs at least this often in the sample."""
    sample_mb: float = Field(default=100.0, gt=0)
    """Text the BPE is trained on, in 10^6 UTF-8 bytes: the first documents of every train
    part in order, an equal share per part."""


class TokenizeConfig(StageConfig):
    """Which tokenizer, how rows are packed, and how many encoding workers."""

    tokenizer: Gpt2TokenizerConfig | TrainedTokenizerConfig = Field(
        default_factory=Gpt2TokenizerConfig, discriminator="kind"
    )
    """``{kind: gpt2, source: ...}`` or ``{kind: train, vocab_size: ...}``."""
    seq_len: int = Field(default=2048, ge=1)
    """Tokens of context; rows hold ``seq_len + 1`` ids (inputs ``[:-1]``, targets ``[1:]``)."""
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    """Dedup splits to tokenize; each becomes ``{output}/{split}/``."""
    mixture: Literal["pile"] | dict[str, float] | None = None
    """Pack every component (pile_set_name) into its own shards and record its epochs, so
    the loader can weight components: ``pile`` (the Pile's table) or name -> epochs. A
    document of a component not listed fails the stage. None: one stream per split."""
    workers_min: int = Field(default=1, ge=1)
    """Encoding actors the pool starts with."""
    workers_max: int | None = Field(default=None, ge=1)
    """Encoding actors the pool may grow to (one CPU each); default: the cluster's CPUs."""
    batch_rows: int = Field(default=512, ge=1)
    """Documents encoded per actor call (a Parquet row group is read in batches of this)."""
    chunk_chars: int = Field(default=1 << 20, ge=1024)
    """Documents longer than this are encoded in chunks of about this many characters, cut
    at safe points (same ids, bounded memory)."""

    volatile_fields = frozenset({"workers_min", "workers_max", "batch_rows", "chunk_chars"})

    @model_validator(mode="after")
    def _components_have_distinct_directories(self) -> TokenizeConfig:
        epochs = self.epochs or {}
        directories = {component_dir(name) for name in epochs}
        if len(directories) != len(epochs) or "" in directories:
            raise ValueError("mixture component names must map to distinct directory names")
        if any(e <= 0 for e in epochs.values()):
            raise ValueError("mixture epochs must be positive")
        return self

    @property
    def epochs(self) -> dict[str, float] | None:
        return PILE_EPOCHS if self.mixture == "pile" else self.mixture

    @property
    def streams(self) -> list[str]:
        """The token streams of a split: its components with a mixture, else one ("")."""
        return sorted(self.epochs) if self.epochs else [""]


def component_dir(name: str) -> str:
    """A component's directory under its split: ``Gutenberg (PG-19)`` -> ``gutenberg-pg-19``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
