"""The pipeline's stages. Importing this package registers every stage with the executor."""

# One import per stage module; each registers itself with ``pipeline.stage.register``.
from stages import convert, dedup, download, evaluate, tokenize, train  # noqa: F401
