"""Convert: our JAX checkpoints to and from Hugging Face safetensors directories (GPT-J and
GPT-NeoX), streaming, exact, and the ``convert`` pipeline stage.

- ``layout``: the Hugging Face tensors and shapes, export dtypes, ``ConvertError``.
- ``hf_dir``: writing a model directory from a stream of tensors; reading one back lazily.
- ``checkpoint``: a train stage output's checkpoint exported tensor by tensor, and a Hugging
  Face directory imported as a params-only train output for fine-tuning.
- ``stage``: the registered ``convert`` stage (export, then the MLflow Model Registry).
- ``cli``: ``meshline convert export|import``.

The train output itself (its files, ``CheckpointReader``, ``read_model_config``,
``write_checkpoint``) is ``stages.train.output``'s, and the parameter tree's shapes and checks
``stages.train.params``'s. Importing this package registers the stage.
"""

from stages.convert.checkpoint import (
    export_checkpoint,
    export_train_output,
    import_checkpoint,
    iter_checkpoint_tensors,
)
from stages.convert.hf_dir import (
    INDEX,
    ExportSummary,
    export_hf,
    import_hf,
    new_directory,
    write_hf,
)
from stages.convert.layout import DTYPES, ConvertError, hf_tensor_shapes
from stages.convert.stage import MODEL_UNIT, ConvertConfig, run

__all__ = [
    "DTYPES",
    "INDEX",
    "MODEL_UNIT",
    "ConvertConfig",
    "ConvertError",
    "ExportSummary",
    "export_checkpoint",
    "export_hf",
    "export_train_output",
    "hf_tensor_shapes",
    "import_checkpoint",
    "import_hf",
    "iter_checkpoint_tensors",
    "new_directory",
    "run",
    "write_hf",
]
