"""The file-system steps of a checkpoint save: durable atomic text writes, flushing a folder to disk,
and the few collectives the save needs beyond ``fastcps.distributed`` (objects across ranks).

Every text file fastcps writes into a checkpoint (the marker, ``latest``, the export's index and config)
goes through ``write_atomic``: a reader sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as tdist


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to its disk. A file another rank wrote is clean in
    this rank's cache: the call costs an open. File systems that refuse fsync on a folder are let be."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it, flushed, then ``os.replace``: a kill at
    any point leaves the old content or the new, and once this returns the new content is on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def flush_tree(folder: Path) -> dict[str, int]:
    """Flush every file under ``folder`` (and the folders' entries) to disk; returns {relative path:
    size in bytes} of the files."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
            out[path.relative_to(folder).as_posix()] = path.stat().st_size
        elif path.is_dir():
            fsync_path(path)
    fsync_path(folder)
    return out


def _collective() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _collective():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _collective():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out
