"""A ``HubRepo`` against the Hugging Face cache and hub: is it complete here (no network), which files of
the hub's listing it takes, how large they are, and the download (``huggingface_hub.snapshot_download``,
which honours HF_HOME / HF_HUB_CACHE, HF_TOKEN and locks each file, so ranks sharing a cache download a
file once). Errors become FileNotFoundError naming the repo, the config key and the fix."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path, PurePosixPath

from fastcps.fetch.items import WEIGHT_SUFFIXES, HubRepo

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_VARIANT = re.compile(r"^[^.]+(?:-\d+-of-\d+)?\.[^.]+\.")  # model.fp16.safetensors: a dtype variant
FETCH_HINT = (
    "run `python -m fastcps.fetch --config CONFIG` (the run's config with its --set flags) on every node "
    "first, or give the nodes one shared HF_HOME; a multi-node DeepSpeed launch passes HF_HOME, HF_TOKEN "
    "and HF_HUB_OFFLINE to the other nodes only through a .deepspeed_env file"
)


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (read now, as ``fastcps.rewards._util.hub_offline``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The hub cache as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub), read now."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_HOME", default)).expanduser() / "hub"


def repo_folder(item: HubRepo) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=item.repo_id, repo_type=item.repo_type)


def cached_commit(item: HubRepo) -> str | None:
    """The commit the cache maps ``item.revision`` to (refs/<revision>), None when it has none."""
    if _COMMIT.match(item.revision):
        return item.revision
    ref = repo_folder(item) / "refs" / item.revision
    return ref.read_text().strip() if ref.is_file() else None


def snapshot(item: HubRepo) -> Path | None:
    commit = cached_commit(item)
    if commit is None:
        return None
    path = repo_folder(item) / "snapshots" / commit
    return path if path.is_dir() else None


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _present(root: Path, rel: str) -> bool:
    return (root / rel).is_file()  # follows the cache's symlinks: a dangling one is missing


def missing_locally(item: HubRepo) -> list[str]:
    """What ``item`` lacks in the local cache (empty: complete): the snapshot, a required file, or a
    folder's weights (every shard an index names, else one weight file). No network."""
    root = snapshot(item)
    if root is None:
        return [f"no snapshot of {item.label} ({item.revision}) in {cache_dir()}"]
    lost = [f for f in item.required if not any(_present(root, alt) for alt in f.split("|"))]
    for folder in item.weights:
        where = root / folder
        names = sorted(p.name for p in where.iterdir() if p.is_file()) if where.is_dir() else []
        # model.safetensors.index.json before pytorch_model.bin.index.json, as the loaders prefer them
        indexes = sorted(
            (n for n in names if n.endswith(".index.json")), key=lambda n: ".safetensors" not in n
        )
        if indexes:
            shards = set(json.loads((where / indexes[0]).read_text()).get("weight_map", {}).values())
            lost += [str(PurePosixPath(folder, s)) for s in sorted(shards) if not _present(where, s)]
        elif not any(_is_weight(n) and not _VARIANT.match(n) for n in names):
            lost.append(f"{folder or '.'}/ weights")
    return lost


def local_size(item: HubRepo) -> int:
    """Bytes of the cached files ``item`` selects (what is there now)."""
    root = snapshot(item)
    if root is None:
        return 0
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return sum((root / f).stat().st_size for f in select(item, {f: 0 for f in files}))


def select(item: HubRepo, listing: dict[str, int]) -> dict[str, int]:
    """The files of ``listing`` (path -> size) that ``item`` needs: those matching its patterns, and in each
    folder one weight format: safetensors when the folder has any (not dtype variants such as
    ``model.fp16.safetensors``), else the rest (``pytorch_model.bin``)."""
    chosen = {f: s for f, s in listing.items() if any(fnmatch.fnmatch(f, p) for p in item.allow_patterns)}
    folders: dict[str, list[str]] = {}
    for f in chosen:
        if _is_weight(f):
            folders.setdefault(str(PurePosixPath(f).parent), []).append(f)
    for files in folders.values():
        plain = [f for f in files if not _VARIANT.match(PurePosixPath(f).name)]
        safetensors = [f for f in plain if f.endswith(".safetensors")]
        keep = set(safetensors or plain or files)
        for f in files:
            if f not in keep:
                del chosen[f]
    for f in [f for f in chosen if f.endswith(".index.json")]:  # the index of a weight format not kept
        fmt = PurePosixPath(
            f.removesuffix(".index.json")
        ).suffix  # model.safetensors.index.json: .safetensors
        folder = PurePosixPath(f).parent
        if fmt in WEIGHT_SUFFIXES and not any(
            g.endswith(fmt) and PurePosixPath(g).parent == folder for g in chosen if _is_weight(g)
        ):
            del chosen[f]
    return chosen


def listing(item: HubRepo) -> tuple[str, dict[str, int]]:
    """(commit, path -> size) of the repo's revision on the hub; errors are ``hub_error``s."""
    import huggingface_hub

    try:
        info = huggingface_hub.HfApi().repo_info(
            item.repo_id, repo_type=item.repo_type, revision=item.revision, files_metadata=True
        )
    except Exception as err:
        raise hub_error(item, err) from err
    return info.sha, {s.rfilename: int(s.size or 0) for s in info.siblings or []}


def download(item: HubRepo, files: list[str]) -> Path:
    """``files`` of ``item`` into the hub cache (those already there are kept); the snapshot folder."""
    import huggingface_hub

    try:
        path = huggingface_hub.snapshot_download(
            item.repo_id,
            repo_type=item.repo_type,
            revision=item.revision,
            allow_patterns=sorted(files),
            cache_dir=str(cache_dir()),
        )
    except Exception as err:
        raise hub_error(item, err) from err
    return Path(path)


def hub_error(item: HubRepo, err: Exception) -> FileNotFoundError:
    """A clear FileNotFoundError for a failed hub call: which repo, which config key, and the fix."""
    from huggingface_hub import errors

    def kinds(*names):  # the error classes this huggingface_hub version has
        return tuple(getattr(errors, n) for n in names if hasattr(errors, n))

    name = f"{item.label} (config key `{item.key}`, {item.what})"
    url = f"https://huggingface.co/{'' if item.repo_type == 'model' else item.repo_type + 's/'}{item.repo_id}"
    if isinstance(err, kinds("GatedRepoError")):
        why = (
            f"gated repo: accept the licence at {url} with your account and set HF_TOKEN (or run `hf auth "
            "login`) on every node"
        )
    elif isinstance(err, kinds("RepositoryNotFoundError")):
        why = "no such repo on the hub (or a private one: set HF_TOKEN); check the config value"
    elif isinstance(err, kinds("RevisionNotFoundError")):
        why = f"the hub has no revision {item.revision!r} of it"
    elif isinstance(err, kinds("OfflineModeIsEnabled", "LocalEntryNotFoundError")) or offline():
        why = f"not in the cache and the hub is not reachable (HF_HUB_OFFLINE=1 or no network): {FETCH_HINT}"
    else:  # no network, the hub down, ...
        why = f"{type(err).__name__}: {err} (is the hub reachable from here? HF_ENDPOINT sets a mirror)"
    return FileNotFoundError(f"{name}: {why}")


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
