"""The train stage and the model it trains.

`model_config` holds the typed model config and presets, `model` the Flax model, `sharding`
the logical-axis rules, `hf_mapping` the name mapping to Hugging Face state dicts,
`generate` KV-cache decoding; `config`, `optim`, `loader`, `trainer` and `hosts` the
training recipe and its Ray actors; `stage` registers the pipeline stage. Train, convert and
evaluate all import the model from here. Importing this package stays light: the stage
module loads JAX only when the stage runs.
"""

from stages.train import stage  # noqa: F401
