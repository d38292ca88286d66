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

from importlib import import_module
from typing import Any

from stages.convert.config import DEFAULT_MAX_SHARD_BYTES, ConvertConfig
from stages.convert.stage import MODEL_UNIT, run

_LAZY = {
    "export_checkpoint": "checkpoint",
    "export_train_output": "checkpoint",
    "import_checkpoint": "checkpoint",
    "iter_checkpoint_tensors": "checkpoint",
    "INDEX": "hf_dir",
    "ExportSummary": "hf_dir",
    "export_hf": "hf_dir",
    "import_hf": "hf_dir",
    "new_directory": "hf_dir",
    "write_hf": "hf_dir",
    "DTYPES": "layout",
    "ConvertError": "layout",
    "hf_tensor_shapes": "layout",
}
"""Names re-exported from modules that import NumPy, safetensors or JAX: loaded when first
used, so registering the stage (``meshline status``) stays light."""


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "MODEL_UNIT", "ConvertConfig", "run", *_LAZY]
