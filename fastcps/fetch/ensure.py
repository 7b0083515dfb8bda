"""The trainer's start-up check: before any model loads (and so before the first collective of training),
every rank makes sure its node holds every file the config needs.

- All there: nothing else happens (no network call).
- Missing and ``HF_HUB_OFFLINE=1``: FileNotFoundError at once, on every rank that lacks them, naming each
  repo / file / prompt set, its config key and the fix (``python -m fastcps.fetch`` on every node, or a
  shared HF_HOME). The trainer's entry point exits 2 with it.
- Missing and online: every rank downloads what its node lacks, now, before loading. Each rank rather
  than one per node: it needs no collective here (where a slow download would hold the others at a
  barrier), and ranks sharing a cache still download each file once (huggingface_hub locks each file;
  prompt sets are written atomically). A shared network HF_HOME is best filled once beforehand with
  ``python -m fastcps.fetch`` (file locks over NFS are not reliable).
- A local path that does not exist: FileNotFoundError, online or not.
- The source images of edit rows (``fastcps.edit_images``): URL ones are downloaded as above; then every
  image must exist and decode (``check_edit_images``), else FileNotFoundError naming the images, their
  rows and lines, the config key and the fix, online or not.
"""

from __future__ import annotations

import logging

from fastcps.fetch import core, hub
from fastcps.fetch.items import EditImages, EngineModels, LocalPath
from fastcps.fetch.needs import config_items

log = logging.getLogger(__name__)


def _line(row: core.Row) -> str:
    it = row.item
    return f"  - {it.key}: {it.label} ({it.what}){': ' + row.detail if row.detail else ''}"


def ensure_local(cfg, *, policy: bool = True) -> None:
    """See the module doc. ``policy``: False when the caller brings its own policy object."""
    from fastcps.edit_images import check_edit_images

    rows = [core.survey(it, online=False) for it in config_items(cfg, policy=policy)]
    for r in rows:  # its own error: every missing image by row and line, with the fix
        if isinstance(r.item, EditImages) and r.state == core.MISSING:
            check_edit_images(r.item.source, r.item.key)
    absent = [r for r in rows if isinstance(r.item, LocalPath) and r.state == core.MISSING]
    if absent:
        raise FileNotFoundError(
            "the config names files that do not exist here:\n" + "\n".join(_line(r) for r in absent)
        )
    _get_lacking(rows)
    for r in rows:  # after the downloads: URL images too
        if isinstance(r.item, EditImages):
            check_edit_images(r.item.source, r.item.key)


def _get_lacking(rows: list[core.Row]) -> None:
    lacking = [r for r in rows if r.state == core.DOWNLOAD and not isinstance(r.item, EngineModels)]
    if not lacking:
        return
    listed = "\n".join(_line(r) for r in lacking)
    if hub.offline():
        raise FileNotFoundError(
            f"HF_HUB_OFFLINE=1 and this node's cache ({hub.cache_dir()}) lacks files the run needs:\n"
            f"{listed}\nfix: {hub.FETCH_HINT}"
        )
    log.warning(
        "this node's cache (%s) lacks files the run needs:\n%s\nevery rank downloads what its node lacks "
        "now, before loading (ranks sharing a cache fetch each file once); to start without waiting here, %s",
        hub.cache_dir(),
        listed,
        hub.FETCH_HINT,
    )
    for row in lacking:
        core.get(row)
