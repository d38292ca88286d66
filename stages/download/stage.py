"""The download stage: plans the files, fetches those not yet committed, commits the manifest.

Files come from the configured ``sources`` (and ``base_url``/``checksums``), or, when the
pipeline configures a ``demo_corpus`` stage, from every file its mirror's ``SHA256SUMS.txt``
lists: the demo corpus is downloaded through the same path as any mirror.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from pipeline import storage
from pipeline.secrets import redact_url
from pipeline.stage import Source, StageContext, register
from stages.demo_corpus.build import CHECKSUMS
from stages.download.config import MIRROR_STAGE, DownloadConfig, DownloadError
from stages.download.fetch import fetch_all
from stages.download.hub import Hub
from stages.download.manifest import MANIFEST_UNIT, read_manifest, write_manifest
from stages.download.sources import FileItem, load_checksums, parse_checksums, plan_files

log = logging.getLogger("meshline.download")


def plan(ctx: StageContext, hub: Hub) -> list[FileItem]:
    """Every file the stage must hold, with its expected sha256 where one is published;
    the commits ``hf://`` sources resolve to are pinned in the ledger."""
    config: DownloadConfig = ctx.config
    if MIRROR_STAGE not in ctx.inputs:
        sums = load_checksums(config.checksums, config.base_url, config, hub)
        items = plan_files(config.sources, config.base_url, sums, hub)
        hub.pin(ctx.ledger)
        return items
    mirror = ctx.inputs[MIRROR_STAGE].uri
    sums = parse_checksums(storage.read_text(storage.join(mirror, CHECKSUMS)))
    items = plan_files(sorted(sums), mirror, sums)
    # Recorded relative to the mirror: its path depends on where the pipeline root is.
    return [replace(item, source=f"{MIRROR_STAGE}:{item.name}") for item in items]


def _raise_failures(failed: dict[str, str], planned: int) -> None:
    listing = "\n".join(f"  {message}" for _, message in sorted(failed.items()))
    raise DownloadError(
        f"download failed for {len(failed)} of {planned} files "
        f"(the other {planned - len(failed)} are committed):\n{listing}"
    )


@register("download", DownloadConfig, optional_inputs=(MIRROR_STAGE,))
def run(ctx: StageContext) -> None:
    """Fetch every planned file not yet committed, then commit the manifest."""
    config: DownloadConfig = ctx.config
    started = time.monotonic()
    if ctx.ledger.is_committed(MANIFEST_UNIT):
        # Finished before (the process died before the executor saw it): the mirror and the
        # network are not needed again.
        listed = read_manifest(ctx.output)
        log.info("download: all %d files already committed", len(listed))
        ctx.log_sources([Source(f["name"], f["source"], f["sha256"]) for f in listed])
        ctx.record(files=0, bytes=0, skipped=len(listed), seconds=time.monotonic() - started)
        return
    hub = Hub.open(config, ctx.ledger)
    items = plan(ctx, hub)
    todo = [item for item in items if not ctx.ledger.is_committed(item.name)]
    skipped = len(items) - len(todo)
    if skipped:
        log.info("download: %d of %d files already committed, skipping them", skipped, len(items))
    fetched, failed = fetch_all(ctx.output, todo, config, hub.token)
    if failed:
        _raise_failures(failed, len(items))
    digests = {f["name"]: f["sha256"] for f in write_manifest(ctx.ledger, [i.name for i in items])}
    # A hub file is named as the manifest names it, at its commit, not by its resolve URL.
    located = {i.name: i.source if i.hub else redact_url(i.url) for i in items}
    ctx.log_sources([Source(name, uri, digests[name]) for name, uri in located.items()])
    size = sum(f.size for f in fetched)
    seconds = time.monotonic() - started
    log.info(
        "download: %d files, %.1f MB in %.1f s, %d skipped (already committed)",
        len(fetched),
        size / 1e6,
        seconds,
        skipped,
    )
    ctx.record(files=len(fetched), bytes=size, skipped=skipped, seconds=seconds)
