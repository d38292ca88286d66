"""The demo corpus stage: the offline demo's Pile mirror, built once per config.

Its output is a mirror as the Pile's publish theirs (data files and ``SHA256SUMS.txt``),
committed as one ledger unit. The download stage, when the pipeline configures this stage,
downloads every file listed there through its normal path, as from any other mirror.
"""

from __future__ import annotations

import logging

from pipeline.stage import StageContext, register
from stages.demo_corpus.build import CHECKSUMS, corpus_files
from stages.demo_corpus.config import DemoCorpusConfig

log = logging.getLogger("meshline.demo_corpus")

CORPUS_UNIT = "corpus"


@register("demo_corpus", DemoCorpusConfig)
def run(ctx: StageContext) -> None:
    """Build the corpus (unless committed already) and commit its files as one unit."""
    if not ctx.ledger.is_committed(CORPUS_UNIT):
        files = corpus_files(ctx.config)
        with ctx.ledger.unit(CORPUS_UNIT) as unit:
            for name, data in files.items():
                with unit.open(name) as f:
                    f.write(data)
    record = ctx.ledger.record(CORPUS_UNIT)
    data_files = [f for f in record["files"] if f["path"] != CHECKSUMS]
    size = sum(f["size"] for f in data_files)
    ctx.record(files=len(data_files), bytes=size)
    log.info("demo_corpus: %d files, %.1f MB compressed", len(data_files), size / 1e6)
