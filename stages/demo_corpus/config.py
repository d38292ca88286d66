"""The demo corpus stage's config: what the corpus holds and how it is cut into files."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.stage import StageConfig


class DemoCorpusConfig(StageConfig):
    """What the demo corpus holds and how it is cut into files."""

    train_shards: int = Field(default=4, ge=1, le=100)
    """Number of train files, ``train/00.jsonl.zst`` onwards."""
    max_text_mb: float = Field(default=12.0, gt=0)
    """Budget of uncompressed text (UTF-8 bytes of every document, all splits, in 10^6
    bytes); the Github component fills what the math documents and copies leave."""
    math_documents: int = Field(default=2000, ge=1)
    """Number of generated "DM Mathematics" documents."""
    questions_per_math_document: int = Field(default=30, ge=1)
    """Question/answer pairs in each math document (all of one kind, as in DM)."""
    docstrings: bool = True
    """Also add, for each source file, a document of its docstrings (English prose)."""
    max_file_kb: int = Field(default=256, ge=1)
    """Source files larger than this are skipped (generated tables would dominate)."""
    val_fraction: float = Field(default=0.02, ge=0, lt=0.5)
    """Share of each component's documents held out as val (at least one if above 0)."""
    test_fraction: float = Field(default=0.02, ge=0, lt=0.5)
    """Share of each component's documents held out as test (at least one if above 0)."""
    exact_duplicates: int = Field(default=4, ge=0)
    """Train documents copied verbatim into train again."""
    near_duplicates: int = Field(default=8, ge=0)
    """Github train documents copied into train again with one line changed."""
    contaminated_documents: int = Field(default=4, ge=0)
    """Val/test documents also copied into train, for decontamination to remove."""
    seed: int = 0
    """Seed of every choice: which files, which split, the math questions, the shuffles."""

    @model_validator(mode="after")
    def _held_out_leaves_train(self) -> DemoCorpusConfig:
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ValueError("val_fraction + test_fraction must leave most documents in train")
        return self
