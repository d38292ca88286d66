"""The pipeline's stages, one module or subpackage each, in the order data flows:

- ``demo_corpus``: the offline demo's Pile-format mirror, built from the standard library.
- ``documents`` and ``compression``: the document file formats and record fields that
  download checks and dedup reads, and streaming zstd/gzip decoding.
- ``download``: files from https, gs, file or a mirror stage, verified, with a manifest.
- ``dedup``: exact, decontamination and MinHash-LSH near-duplicate removal on Ray Data.
- ``tokenize``: BPE into packed Arrow rows, the tokenizer shipped with them.
- ``train``: the model, sharding, optimiser, loader and hosts; ``train.output`` owns the
  train stage's output format (model config, checkpoints) that later stages read.
- ``convert``: the checkpoint to and from Hugging Face directories.
- ``evaluate``: lm-eval-harness-compatible scoring, samples and the lm-eval adapter.

Importing a stage module registers that stage with the executor; ``stages.all`` imports
every one (the default ``stage_modules``). This file imports nothing, so a Ray worker that
runs one stage's code loads only that stage (not JAX, Orbax and transformers for a dedup
task).
"""
