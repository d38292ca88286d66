"""Every stage of the pipeline: importing this module registers them all with the executor."""

from stages import convert, dedup, demo_corpus, download, evaluate, tokenize, train  # noqa: F401
