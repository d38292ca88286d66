"""The tokenize stage: dedup's Parquet parts -> packed Arrow IPC shards, on Ray Data.

Work, in ledger units (see the package docstring for what they write):

1. ``tokenizer``: load GPT-2's BPE or train one on a deterministic sample of dedup's train
   split, and save it. Everything after reloads it from those files.
2. One unit per dedup part. The Parquet row groups of the parts not yet committed are the
   work items of a Ray Data ``map_batches`` on an autoscaling actor pool (one tokenizer
   per actor, one core each) that reads its row group and encodes it a batch of documents
   at a time, EOS after each (``encoding``). With ``preserve_order`` the encoded batches
   reach this process in part and row order; it packs them into rows and streams each
   part's rows into that part's shard, carrying the ids left over into the next part
   (``parts``). Packing here, in order, is what makes the bytes independent of worker count.
3. ``manifest``: row, document and token counts per split and component (``manifest``).

With a ``mixture`` every component is its own stream (its own shards and carries), so a
loader can sample components by weight; without one a split is a single stream.

A restart skips committed units: it resumes at the first uncommitted part of each split,
with the carries the previous part saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from itertools import groupby

import numpy as np

from pipeline import storage
from pipeline.progress import report
from pipeline.stage import StageContext, register
from stages.tokenize.config import Gpt2TokenizerConfig, TokenizeConfig
from stages.tokenize.manifest import (
    MANIFEST_UNIT,
    TOKENIZER_DIR,
    missing_components,
    write_manifest,
)
from stages.tokenize.parts import (
    Encoded,
    Part,
    TokenizeError,
    Totals,
    commit_part,
    plan_parts,
    read_carries,
    sample_texts,
)
from stages.tokenize.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("meshline.tokenize")

TOKENIZER_UNIT = "tokenizer"


def _make_tokenizer(ctx: StageContext, config: TokenizeConfig) -> Tokenizer:
    """GPT-2's tokenizer from its source, or a BPE trained on a sample of dedup's train."""
    # Loaded when the stage runs, as Ray Data is (see tokenize_parts).
    from stages.tokenize.bpe import load_gpt2, train_bpe

    spec = config.tokenizer
    if isinstance(spec, Gpt2TokenizerConfig):
        return load_gpt2(spec.source, spec.sha256, config.seq_len)
    log.info(
        "tokenize: training a %d-id BPE on %.0f MB of train text",
        spec.vocab_size,
        spec.sample_mb,
    )
    return train_bpe(
        sample_texts(ctx.inputs["dedup"].uri, int(spec.sample_mb * 1e6)),
        spec.vocab_size,
        spec.special_tokens,
        spec.whitespace_tokens,
        spec.min_frequency,
        config.seq_len,
    )


def build_tokenizer(ctx: StageContext, config: TokenizeConfig) -> Tokenizer:
    """Commit the tokenizer unit (once) and return the tokenizer as reloaded from it."""
    directory = storage.join(ctx.output, TOKENIZER_DIR)
    if not ctx.ledger.is_committed(TOKENIZER_UNIT):
        started = time.monotonic()
        tokenizer = _make_tokenizer(ctx, config)
        with ctx.ledger.unit(TOKENIZER_UNIT) as unit:
            for name, data in sorted(tokenizer.files.items()):
                with unit.open(f"{TOKENIZER_DIR}/{name}") as f:
                    f.write(data)
            unit.metadata.update(fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size)
        log.info(
            "tokenize: %s tokenizer, %d ids, fingerprint %s (%.1f s)",
            config.tokenizer.kind,
            tokenizer.vocab_size,
            tokenizer.fingerprint[:12],
            time.monotonic() - started,
        )
    return load_tokenizer(directory)


def _first_carries(
    ctx: StageContext, parts: list[Part], pending: list[Part], streams: list[str], dtype: np.dtype
) -> dict[str, dict[str, np.ndarray]]:
    """Per split with pending parts: the ids carried into its first pending part, per stream."""
    carries: dict[str, dict[str, np.ndarray]] = {}
    for part in pending:
        if part.split not in carries:
            previous = next(
                (p for p in parts if p.split == part.split and p.index == part.index - 1), None
            )
            carries[part.split] = read_carries(ctx.ledger, ctx.output, previous, streams, dtype)
    return carries


def tokenize_parts(
    ctx: StageContext, parts: list[Part], tokenizer: Tokenizer, config: TokenizeConfig
) -> dict[str, float]:
    """Encode and pack every uncommitted part; returns facts about this run's work."""
    started = time.monotonic()
    row_len = config.seq_len + 1
    pending = [p for p in parts if not ctx.ledger.is_committed(p.unit)]
    carries = _first_carries(ctx, parts, pending, config.streams, tokenizer.dtype)
    by_source = {p.source: p for p in pending}
    waiting = list(pending)
    run_totals = Totals()
    first_batch_at: list[float] = []

    def commit(part: Part, batches: Iterator[Encoded]) -> None:
        carries[part.split], totals = commit_part(
            ctx.ledger, part, carries[part.split], batches, row_len, tokenizer.dtype
        )
        run_totals.merge(totals)
        log.info(
            "tokenize: %s: %d documents, %d tokens", part.unit, totals.documents, totals.tokens
        )
        report(len(pending) - len(waiting), len(pending), "parts", tokens=run_totals.tokens)

    # Ray Data loads here, not with the package: training hosts import this package for its
    # reader and manifest, and Ray's import was a sixth of their start-up.
    from stages.tokenize.encoding import encoded_batches

    batches = encoded_batches(pending, storage.join(ctx.output, TOKENIZER_DIR), config)
    for source, group in groupby(batches, key=lambda r: r.source):
        first_batch_at = first_batch_at or [time.monotonic()]
        part = by_source.get(source)
        if part is None or part not in waiting:
            raise TokenizeError(f"{source}: rows arrived out of order (or from an unplanned file)")
        # Parts that produced no rows (empty files) come before it: they pass the carry on.
        while waiting[0] is not part:
            commit(waiting.pop(0), iter(()))
        commit(waiting.pop(0), group)
    for part in waiting:
        commit(part, iter(()))
    return {
        "documents_encoded": run_totals.documents,
        "tokens_encoded": run_totals.tokens,
        "workers": len(run_totals.workers),
        "worker_peak_rss_mb": run_totals.peak_rss_kb / 1024,
        "encode_seconds": run_totals.encode_seconds,
        "startup_seconds": (first_batch_at[0] if first_batch_at else time.monotonic()) - started,
    }


@register("tokenize", TokenizeConfig, inputs=("dedup",))
def run(ctx: StageContext) -> None:
    """Tokenizer, then every uncommitted part, then the manifest."""
    config: TokenizeConfig = ctx.config
    started = time.monotonic()
    if ctx.ledger.is_committed(MANIFEST_UNIT):
        log.info("tokenize: already complete")
        return
    tokenizer = build_tokenizer(ctx, config)
    parts = plan_parts(ctx.inputs["dedup"].uri, list(config.splits))
    facts = tokenize_parts(ctx, parts, tokenizer, config)
    manifest = write_manifest(ctx.ledger, config, parts, tokenizer)
    seconds = time.monotonic() - started
    metrics = {**facts, "seconds": seconds, "tokens_per_second": facts["tokens_encoded"] / seconds}
    for name, split in manifest["splits"].items():
        metrics[f"{name}.rows"] = split["rows"]
        metrics[f"{name}.tokens"] = split["tokens"]
        for component, counts in split["components"].items():
            metrics[f"{name}.tokens.{component}"] = counts["tokens"]
    missing = missing_components(manifest)
    if missing:
        metrics["mixture.components_missing"] = len(missing)
        log.warning(
            "tokenize: the mixture's train data lacks %d of %d components (%s); their share "
            "of each batch goes to the other components, in proportion to their weights",
            len(missing),
            len(manifest["mixture"]),
            ", ".join(missing),
        )
    ctx.record(**metrics)
    log.info(
        "tokenize: %s; %d documents, %d tokens encoded in %.1f s (%.0f tokens/s, %d workers)",
        ", ".join(f"{n} {s['rows']} rows" for n, s in manifest["splits"].items()),
        facts["documents_encoded"],
        facts["tokens_encoded"],
        seconds,
        metrics["tokens_per_second"],
        facts["workers"],
    )
