"""The convert stage's settings (importable without NumPy, safetensors or JAX)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.stage import StageConfig

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
"""The largest safetensors shard an export writes by default (as transformers' 2 GB)."""
ExportDtype = Literal["float32", "bfloat16", "float16"]
"""dtypes an export may cast the float32 weights to."""


class ConvertConfig(StageConfig):
    """Export of the trained model as a Hugging Face directory."""

    volatile_fields = frozenset({"registered_model"})

    step: int | None = None
    """Checkpoint step to export; None takes the latest."""
    dtype: ExportDtype = "float32"
    """dtype of the exported weights (cast from float32)."""
    max_shard_bytes: int = Field(default=DEFAULT_MAX_SHARD_BYTES, gt=0)
    """Largest safetensors shard; a larger single tensor gets a shard of its own."""
    registered_model: str | None = None
    """MLflow registered model the export becomes a version of; None: the pipeline's name."""
