"""Convert: our JAX checkpoints to and from Hugging Face safetensors directories (GPT-J and
GPT-NeoX), streaming, exact, and the ``convert`` pipeline stage.

- ``layout``: expected tensors and shapes, export dtypes, ``ConvertError``.
- ``hf_dir``: writing a model directory from a stream of tensors; reading one back lazily.
- ``checkpoint``: the train stage's Orbax checkpoints, read leaf by leaf for export and
  written from a Hugging Face directory for fine-tuning.
- ``stage``: the registered ``convert`` stage (export, then the MLflow Model Registry).
- ``cli``: ``meshline convert export|import``.

Importing this package registers the stage.
"""

from stages.convert.checkpoint import (
    CheckpointReader,
    export_checkpoint,
    export_train_output,
    import_checkpoint,
    iter_checkpoint_tensors,
    load_checkpoint_params,
    read_model_config,
    write_checkpoint,
)
from stages.convert.hf_dir import (
    INDEX,
    ExportSummary,
    export_hf,
    import_hf,
    new_directory,
    write_hf,
)
from stages.convert.layout import DTYPES, ConvertError, check_params, hf_tensor_shapes
from stages.convert.stage import MODEL_UNIT, ConvertConfig, run

__all__ = [
    "DTYPES",
    "INDEX",
    "MODEL_UNIT",
    "CheckpointReader",
    "ConvertConfig",
    "ConvertError",
    "ExportSummary",
    "check_params",
    "export_checkpoint",
    "export_hf",
    "export_train_output",
    "hf_tensor_shapes",
    "import_checkpoint",
    "import_hf",
    "iter_checkpoint_tensors",
    "load_checkpoint_params",
    "new_directory",
    "read_model_config",
    "run",
    "write_checkpoint",
    "write_hf",
]
