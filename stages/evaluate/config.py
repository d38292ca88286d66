"""The evaluate stage's config: which tasks to score, bits per byte, the demo's generated
tasks, samples, and the names of the two models a run may score.

Only pydantic here (no JAX), so the stage registers cheaply.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.stage import StageConfig

TaskName = Literal[
    "lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "sciq"
]
FINAL, INITIAL = "final", "initial"
"""The trained checkpoint, and (with ``compare_initial``) the model its run started from."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class TaskSpec(_Section):
    """One zero-shot task to score."""

    name: TaskName
    """The task whose format the documents have and whose scoring rules apply."""
    source: str | None = None
    """Local or gs:// JSONL/Parquet file with the task's fields; None reads the Hugging Face
    hub (a cluster without internet points this at a copy)."""
    limit: int | None = Field(default=None, gt=0)
    """Score only the first N documents (lm-eval's ``--limit``)."""
    alias: str | None = None
    """Name in results.json and MLflow (default: ``name``), so one format can be scored on
    several files."""

    @property
    def label(self) -> str:
        return self.alias or self.name


class BitsPerByteSpec(_Section):
    """Bits per byte of held-out documents, per Pile component and overall."""

    split: Literal["val", "test"] = "val"
    """The dedup stage's held-out split to read."""
    max_bytes_per_component: int = Field(default=2_000_000, gt=0)
    """UTF-8 bytes read from each component, in document order (the Pile's val split has
    about 1.4 GB; this keeps the measurement minutes, not hours)."""


class DemoTasksSpec(_Section):
    """Tasks generated offline from held-out text (see ``demo_tasks.py``)."""

    split: Literal["val", "test"] = "val"
    """The dedup stage's held-out split the passages come from."""
    lambada: int = Field(default=200, ge=1)
    """Passages in the LAMBADA-format file."""
    choice: int = Field(default=200, ge=1)
    """Questions in the HellaSwag-format file."""
    max_context_chars: int = Field(default=600, ge=50)
    """Longest passage before the predicted word or line."""
    seed: int = 0
    """Seed of which passages and distractors are chosen."""


class SamplesSpec(_Section):
    """Generated continuations logged as an artifact, as the GPT-J release showed them."""

    prompts: list[str] = ["EleutherAI is", "def fibonacci(n):", "What is 12 plus 30?\n"]
    """Prompts to continue."""
    max_new_tokens: int = Field(default=48, ge=1)
    """Tokens generated after each prompt."""
    seed: int = 0
    """Seed of the nucleus sampling."""


class EvaluateConfig(StageConfig):
    """Zero-shot evaluation of the trained checkpoint (lm-evaluation-harness semantics)."""

    tasks: list[TaskSpec] = [
        TaskSpec(name="lambada_openai"),
        TaskSpec(name="hellaswag"),
        TaskSpec(name="piqa"),
        TaskSpec(name="winogrande"),
    ]
    """Tasks to score; the default is GPT-J's published table."""
    bits_per_byte: BitsPerByteSpec | None = BitsPerByteSpec()
    """Bits per byte on held-out text per component; None skips it."""
    demo_tasks: DemoTasksSpec | None = None
    """Also generate and score the demo's offline LAMBADA and HellaSwag-format tasks."""
    step: int | None = None
    """Checkpoint step to evaluate; None takes the latest."""
    compare_initial: bool = False
    """Also score the model the training run started from, to show what training changed."""
    samples: SamplesSpec | None = SamplesSpec()
    """Continuations to generate and log; None skips them."""
    batch_size: int = Field(default=32, ge=1)
    """Rows per forward pass: a speed setting, kept out of the fingerprint."""
    max_length: int | None = Field(default=None, gt=0)
    """Context window in tokens; None uses the model's ``max_len``."""

    volatile_fields: ClassVar[frozenset[str]] = frozenset({"batch_size"})
