"""The demo's corpus: a small Pile-format mirror built offline, the same bytes every time.

- ``config``: ``DemoCorpusConfig``, what the corpus holds and how it is cut into files.
- ``documents``: the document and unit types, the component names.
- ``github``: the "Github" component from this Python installation's standard library (the
  wheels it bundles vendor the same packages several times: real exact and near duplicates).
- ``mathematics``: generated "DM Mathematics" question/answer documents.
- ``build``: splits, deliberate duplicates and leaks, the compressed files and
  ``SHA256SUMS.txt`` (``corpus_files``, ``build_demo_corpus``).
- ``stage``: the ``demo_corpus`` stage, whose output the download stage downloads from.
"""

from stages.demo_corpus.build import CHECKSUMS, build_demo_corpus, corpus_files
from stages.demo_corpus.config import DemoCorpusConfig
from stages.demo_corpus.documents import GITHUB, MATH
from stages.demo_corpus.stage import run

__all__ = [
    "CHECKSUMS",
    "GITHUB",
    "MATH",
    "DemoCorpusConfig",
    "build_demo_corpus",
    "corpus_files",
    "run",
]
