"""The pipeline's stages, one module or subpackage each.

Importing a stage module registers that stage with the executor; ``stages.all`` imports
every one (the default ``stage_modules``). This file imports nothing, so a Ray worker that
runs one stage's code loads only that stage (not JAX, Orbax and transformers for a dedup
task).
"""
