"""The train stage and the model it trains.

- ``model_config``: the typed model config and presets; ``model``: the Flax model;
  ``params``: the parameter tree's leaves, shapes and the check every stored model is held
  to; ``sharding``: the logical-axis rules; ``hf_mapping``: the name mapping to Hugging Face
  state dicts; ``generate``: KV-cache decoding. Train, convert and evaluate all import the
  model from here.
- ``output``: the train stage's output format, the only module that names its files: the
  model config, Orbax checkpoints (saving, restoring, ``CheckpointReader``, ``load_params``)
  and the summary; convert, evaluate and the trainer's ``init_from`` all read through it.
- ``config``, ``optim``, ``loader``, ``trainer``, ``hosts``, ``malloc``, ``memory``: the
  training recipe, its loop, and its Ray Train worker group (``hosts``).
- ``stage``: registers the pipeline stage.

Importing this package stays light: the stage loads JAX only when it runs.
"""

from stages.train import stage  # noqa: F401
