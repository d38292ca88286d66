"""The train stage: the GPT-J / GPT-NeoX model, its sharding rules and generation.

`model_config` holds the typed model config and presets, `model` the Flax model, `sharding`
the logical-axis rules, `hf_mapping` the name mapping to Hugging Face state dicts and
`generate` KV-cache decoding. Train, convert and evaluate all import the model from here.
"""
