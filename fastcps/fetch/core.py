"""Where each needed item stands on this machine (``survey``) and getting it (``get``): shared by
``python -m fastcps.fetch`` and the trainer's start-up check (``fastcps.fetch.ensure``)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fastcps import prompt_sets
from fastcps.fetch import hub
from fastcps.fetch.items import EditImages, EngineModels, HubRepo, Item, LocalPath, PromptSetFile

# states
CACHED, SHIPPED, LOCAL, DOWNLOAD, MISSING, ON_BUILD = (
    "cached",
    "shipped",
    "local",
    "to download",
    "MISSING",
    "on first build",
)


@dataclass
class Row:
    item: Item
    state: str
    size: int | None = None  # bytes; None = unknown
    detail: str = ""  # what is missing, or the count of a prompt set
    files: list[str] = field(default_factory=list)  # a hub repo's selected files (online)
    commit: str | None = None  # the hub's commit of the revision (online)


def _local_path_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def survey(item: Item, online: bool) -> Row:
    """The item's state here and its size; online, hub repos are listed (their sizes from the hub's
    metadata, errors raised as FileNotFoundError naming the item). Downloads nothing."""
    if isinstance(item, LocalPath):
        p = Path(item.path).expanduser()
        if not item.path or not p.exists():
            why = "not set" if not item.path else "does not exist"
            return Row(item, MISSING, detail=f"{why} (config key `{item.key}`)")
        return Row(item, LOCAL, _local_path_size(p))
    if isinstance(item, PromptSetFile):
        s = prompt_sets.get(item.name, item.key)
        if s.shipped or prompt_sets.is_available(s):
            size = len(prompt_sets.read_bytes(s))
            return Row(
                item,
                SHIPPED if s.shipped else CACHED,
                size,
                detail=f"{len(prompt_sets.load(s.name)[0])} prompts",
            )
        size = _remote_size(prompt_sets.url(s)) if online else None
        bad = (
            " (the cached copy has a wrong checksum: replaced)" if prompt_sets.local_path(s).exists() else ""
        )
        return Row(item, DOWNLOAD, size, detail=prompt_sets.url(s) + bad)
    if isinstance(item, EditImages):
        return _survey_images(item)
    if isinstance(item, EngineModels):
        return Row(item, ON_BUILD, None, detail=item.where)
    lost = hub.missing_locally(item)
    if not online:
        return Row(
            item,
            CACHED if not lost else DOWNLOAD,
            hub.local_size(item) if not lost else None,
            "; ".join(lost),
        )
    try:
        commit, listing = hub.listing(item)
    except FileNotFoundError as err:
        if lost:
            raise
        # complete here: a run can use it (offline); say why it was not checked against the hub
        return Row(item, CACHED, hub.local_size(item), f"not checked with the hub ({err})")
    files = hub.select(item, listing)
    current = not lost and hub.cached_commit(item) == commit
    return Row(
        item, CACHED if current else DOWNLOAD, sum(files.values()), "; ".join(lost), sorted(files), commit
    )


def _survey_images(item: EditImages) -> Row:
    """MISSING (naming the files and their lines) when a local image is not here, DOWNLOAD when only URL
    images are missing, else LOCAL with their size. No decoding: ``check_edit_images`` does that."""
    from fastcps import edit_images

    try:
        lost, refs = edit_images.missing_images(item.source, item.key)
    except FileNotFoundError as err:  # its prompt set is not downloaded yet: listed once it is
        return Row(item, DOWNLOAD, None, detail=f"listed once its prompt file is here ({err})")
    images = list(dict.fromkeys(ref for _, _, ref in refs))
    files = [p for p in lost if not edit_images.is_url(p[2])]
    if files:  # the whole report (rows, lines, fix): check_edit_images, which the callers run
        row, line, ref, _ = files[0]
        n = len({p[2] for p in files})
        return Row(
            item,
            MISSING,
            detail=f"{n} of {len(images)} images do not exist (row {row}, line {line}: {ref}, ...)",
        )
    if lost:
        n = len({p[2] for p in lost})
        return Row(item, DOWNLOAD, None, detail=f"{n} of {len(images)} images to download (URL rows)")
    size = sum(edit_images.local_file(r).stat().st_size for r in images)
    return Row(item, LOCAL, size, detail=f"{len(images)} images, {len({r for r, _, _ in refs})} rows")


def _remote_size(url: str) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as resp:
            n = resp.headers.get("Content-Length")
            return int(n) if n is not None else None
    except Exception:  # a size is a courtesy: the download reports real errors
        return None


def get(row: Row) -> None:
    """Download (or build) ``row``'s item; FileNotFoundError naming the item when that fails or leaves
    the cache incomplete."""
    item = row.item
    if isinstance(item, PromptSetFile):
        prompt_sets.download(prompt_sets.get(item.name, item.key))
    elif isinstance(item, EditImages):
        from fastcps import edit_images

        for _, _, ref, _ in edit_images.missing_images(item.source, item.key)[0]:
            # a URL several rows name is listed once per row: downloaded once
            if edit_images.is_url(ref) and not edit_images.local_file(ref).is_file():
                edit_images.download(ref)
    elif isinstance(item, EngineModels):
        try:
            item.build()
        except Exception as err:
            raise FileNotFoundError(
                f"{item.what} (config key `{item.key}`): {type(err).__name__}: {err}"
            ) from err
    elif isinstance(item, HubRepo):
        files = row.files or sorted(hub.select(item, hub.listing(item)[1]))
        hub.download(item, files)
        lost = hub.missing_locally(item)
        if lost:
            raise FileNotFoundError(
                f"{item.label} (config key `{item.key}`, {item.what}): downloaded, but the cache still lacks "
                f"{'; '.join(lost)} (does the repo hold what this loader needs?)"
            )
    elif isinstance(item, LocalPath):
        raise FileNotFoundError(f"{item.what} {item.label!r} (config key `{item.key}`) {row.detail}")
