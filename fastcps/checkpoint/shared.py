"""Start-up check that every rank sees the run directory rank 0 writes.

Rank 0 alone creates the run directory and writes config.json, the metrics, ``latest`` and the
checkpoint markers, and prunes old checkpoints; every rank writes its own files into each checkpoint
(DeepSpeed's optimizer partition, its EMA) and a resume reads all of them on every rank. On node-local
disks that cannot work: the second node would find no checkpoint to resume while the others wait for
it. So at start-up rank 0 writes a file with a random token into the run directory, the token goes to
every rank, and each rank looks for the file; the outcome is gathered, so every rank stops together,
with the same message, when any rank does not see it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from fastcps.checkpoint import files


class RunDirNotShared(FileNotFoundError):
    """Some rank does not see what rank 0 wrote in the run directory (exit code 2)."""


def _read(path: Path, token: str, wait_s: float) -> bool:
    """Whether ``path`` holds ``token``, retried for ``wait_s`` (a network file system may show a new
    file to other nodes a moment later)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text().strip() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_run_dir_shared(run_dir: Path, *, rank: int, world: int, what: str, wait_s: float = 5.0) -> None:
    """Collective. Rank 0 creates ``run_dir`` (when ``what`` is ``output_dir``; a ``--resume`` directory
    must exist) and writes the probe; every rank then reads it. Raises ``RunDirNotShared`` on every rank
    when any rank cannot see it, naming those ranks and their hosts. ``what``: the setting that chose
    the directory, for the message."""
    run_dir = Path(run_dir)
    host = socket.gethostname()
    token, trouble = None, None
    if rank == 0:
        token = f"{uuid.uuid4().hex} {host}"
        try:
            if what == "output_dir":
                run_dir.mkdir(parents=True, exist_ok=True)
            elif not run_dir.is_dir():
                raise FileNotFoundError(f"--resume {run_dir}: no such run directory")
            if world > 1:
                files.write_atomic(run_dir / f".shared-check-{token.split()[0]}", token)
        except OSError as err:
            trouble = str(err)
    token, trouble = files.broadcast_object((token, trouble))
    if trouble:
        raise RunDirNotShared(f"rank 0 cannot use the run directory {run_dir}: {trouble}")
    if world == 1:
        return
    probe = run_dir / f".shared-check-{token.split()[0]}"
    seen = _read(probe, token, 0.0 if rank == 0 else wait_s)
    views = files.gather_objects((rank, host, seen, os.path.abspath(run_dir)))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [v for v in views if not v[2]]
    if not blind:
        return
    writer = views[0]
    who = ", ".join(f"rank {r} on {h} (looked in {where})" for r, h, _, where in blind)
    raise RunDirNotShared(
        f"the run directory is not shared by all ranks: rank 0 on {writer[1]} wrote {probe.name} into "
        f"{writer[3]}, and {who} cannot see it. fastcps needs the run directory ({what}) on a file "
        "system that every node mounts at the same path (NFS, Lustre, GPFS, a cloud file share): every "
        "rank writes its own DeepSpeed optimizer partition (and EMA) into each checkpoint and a resume "
        "reads all of them on every rank, while rank 0 alone writes config.json, the metrics, `latest` "
        "and the checkpoint markers. Fix: set output_dir to an absolute path on a shared mount (--set "
        "output_dir=/shared/runs; --resume a directory there), or run on a single node."
    )
