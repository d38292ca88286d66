"""What a converted model is made of, known before any weight is read: the Hugging Face
tensors in export order with their shapes (from our leaves' shapes, ``stages.train.params``),
the export dtypes, and the error every bad input raises.

Knowing every Hugging Face tensor's name and shape up front is what lets the exporter write
each safetensors header before the tensors' bytes, and so stream them straight to disk.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from stages.train.hf_mapping import tensor_rules
from stages.train.model_config import ModelConfig
from stages.train.params import ModelFormatError, Shape, expected_shapes

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

ConvertError = ModelFormatError
"""Input that cannot be converted; the message names the file or tensor. It is the error of
every stored model that does not hold what it should (``stages.train.params``), so a bad
checkpoint fails export, evaluation and import alike."""


def check_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an export dtype name."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def hf_tensor_shapes(config: ModelConfig) -> list[tuple[str, Shape]]:
    """The Hugging Face tensors in the order the exporter writes them, with their shapes."""
    ours = expected_shapes(config)
    planned: list[tuple[str, Shape]] = []
    for rule in tensor_rules(config):
        # Zero-stride stand-ins: the mapping's reshapes and transposes cost no memory.
        cut = 1 if rule.per_layer else 0
        dummies = [np.broadcast_to(np.float32(0), ours[path][cut:]) for path in rule.ours]
        shape = tuple(rule.to_hf(*dummies).shape)
        names = (
            [rule.hf_name.format(i=i) for i in range(config.n_layers)]
            if rule.per_layer
            else [rule.hf_name]
        )
        planned.extend((name, shape) for name in names)
    return planned
