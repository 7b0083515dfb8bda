"""When a checkpoint counts: the marker, the scan of ``<run>/checkpoints``, publishing and rotation.

A save writes into ``<tag>.partial/``. Once every rank's files are written and flushed, rank 0 writes
the marker ``complete.json`` into it (last, atomically: the files it lists with their sizes, the tag, the
epoch, the time), renames the folder to ``<tag>`` and moves ``latest`` to it (atomically). A folder
counts as a checkpoint only when its marker is there and every file it lists has its size; a kill at
any earlier point leaves a folder that a resume skips.

Checkpoints written before the marker existed ("legacy": no marker) count when the file the old save
wrote last is whole: ``pytorch_lora_weights.safetensors`` for a LoRA run, else ``policy.safetensors``
(its header's data end equals the file's size). Everything else came before it: DeepSpeed's files
before the barrier that ends ``engine.save_checkpoint``, each rank's EMA before the collective gather
that precedes the export.

Order: any checkpoint with a marker is newer than any legacy one (a run directory only gains markers
after the code that writes them); among markers the later (epoch, time saved) is newer; among legacy
folders the later-modified. Only rank 0 calls the functions that change the folder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from fastcps.checkpoint import files

log = logging.getLogger(__name__)

MARKER = "complete.json"
PARTIAL = ".partial"
LATEST = "latest"
MARKER_FORMAT = "fastcps-checkpoint"
# the trainer's tags (periodic epochNNNNN, final, interrupted_epochNNNNN), as written or being written
TAG_FOLDER = re.compile(r"^(epoch\d+|final|interrupted_epoch\d+)(\.partial)?$")
PERIODIC = re.compile(r"^epoch\d+$")


@dataclass
class Found:
    """One folder under ``<run>/checkpoints``: whether it counts, and if not, why."""

    folder: Path
    tag: str
    complete: bool
    why: str  # what is missing (incomplete ones)
    order: tuple  # larger = newer; see the module's docstring
    legacy: bool = False

    @property
    def periodic(self) -> bool:
        return bool(PERIODIC.match(self.tag))


def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def missing_files(folder: Path, listed: dict[str, int]) -> str | None:
    """None when every listed file is there with its size, else what is not."""
    for rel, size in listed.items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the marker says {size}"
    return None


def safetensors_whole(path: Path) -> bool:
    """The file's header parses and its data ends where the file ends (a killed writer leaves less)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, struct.error):
        return False


def legacy_status(folder: Path) -> str | None:
    """None when a checkpoint without marker is complete, else what is missing."""
    policy = folder / "policy.safetensors"
    if not safetensors_whole(policy):
        return "policy.safetensors is missing or cut short (written last but one by the old save)"
    with open(policy, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        lora = any(".lora_" in k for k in json.loads(f.read(n)))
    if lora and not safetensors_whole(folder / "pytorch_lora_weights.safetensors"):
        return "pytorch_lora_weights.safetensors is missing or cut short (written last by the old save)"
    if not any(folder.glob("*model_states.pt")):
        return "DeepSpeed's model states are missing"
    return None


def examine(folder: Path) -> Found:
    marker = read_marker(folder)
    name = folder.name.removesuffix(PARTIAL)
    if marker is not None:
        why = missing_files(folder, marker.get("files", {}))
        order = (1, int(marker.get("epoch", -1)), float(marker.get("saved_at", 0.0)))
        return Found(folder, marker.get("tag", name), why is None, why or "", order)
    if folder.name.endswith(PARTIAL):
        return Found(folder, name, False, f"no {MARKER}: its save did not finish", (0, -1.0))
    why = legacy_status(folder)
    newest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)
    return Found(folder, name, why is None, why or "", (0, newest), legacy=True)


def scan(root: Path) -> list[Found]:
    """Every checkpoint folder under ``root``, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [examine(p) for p in root.iterdir() if p.is_dir() and TAG_FOLDER.match(p.name)]
    return sorted(found, key=lambda f: f.order)


def newest_complete(found: list[Found]) -> Found | None:
    complete = [f for f in found if f.complete]
    return max(complete, key=lambda f: f.order) if complete else None


def seal(folder: Path, *, tag: str, epoch: int, rank: int, world: int) -> None:
    """Collective, after every rank's last write into ``folder``: each rank flushes what it sees there
    to disk and reports it; rank 0 writes the marker listing the union (a rank sees its own files even
    where another's view lags)."""
    views = files.gather_objects(files.flush_tree(folder))
    if rank != 0:
        return
    listed: dict[str, int] = {}
    for view in views:
        for rel, size in view.items():
            listed[rel] = max(size, listed.get(rel, 0))
    marker = {
        "format": MARKER_FORMAT,
        "version": 1,
        "tag": tag,
        "epoch": int(epoch),
        "saved_at": time.time(),
        "world_size": world,
        "files": listed,
    }
    files.write_atomic(Path(folder) / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")


def publish(root: Path, tag: str) -> None:
    """Rank 0, once ``<tag>.partial`` is complete: it becomes ``<tag>`` (an older ``<tag>`` goes first:
    a kill in between leaves the complete ``.partial``, which ``recover`` publishes) and ``latest``
    names it."""
    root = Path(root)
    staged, final = root / f"{tag}{PARTIAL}", root / tag
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)
    files.fsync_path(root)
    files.write_atomic(root / LATEST, tag)


def recover(root: Path) -> None:
    """Rank 0: publish the complete ``.partial`` folders a kill left between marker and rename, and
    point ``latest`` at the newest complete checkpoint (a legacy save moved it before its last files)."""
    root = Path(root)
    for found in scan(root):
        if found.complete and found.folder.name.endswith(PARTIAL):
            log.info("checkpoint %s was complete but not yet renamed: it becomes %s", found.folder, found.tag)
            publish(root, found.tag)
    newest = newest_complete(scan(root))
    latest = root / LATEST
    if newest is not None and (not latest.is_file() or latest.read_text().strip() != newest.folder.name):
        files.write_atomic(latest, newest.folder.name)


def prune(root: Path, keep: int | None) -> None:
    """Rank 0, right after a save completed: remove incomplete leftovers (a newer complete checkpoint now
    exists) and, with ``keep``, all but the newest ``keep`` complete periodic checkpoints. The newest
    complete checkpoint always stays; ``final`` and ``interrupted_*`` are never removed."""
    found = scan(root)
    newest = newest_complete(found)
    for f in found:
        if not f.complete:
            log.info("removing incomplete checkpoint %s (%s): %s is newer and complete", f.folder, f.why,
                     newest.folder.name if newest else "?")  # fmt: skip
            shutil.rmtree(f.folder, ignore_errors=True)
    if keep is None:
        return
    periodic = [f for f in found if f.complete and f.periodic]
    for f in periodic[: max(0, len(periodic) - keep)]:
        if f is not newest:
            shutil.rmtree(f.folder, ignore_errors=True)
