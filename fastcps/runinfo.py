"""What a measurement was taken on: device name, library versions, commit, and CSV rows that carry
them (shared by the benchmarks in bench/ and ``fastcps.gpucheck``)."""

from __future__ import annotations

import csv
import functools
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    import fastcps

    return {"torch": torch.__version__, "triton": tv, "fastcps": getattr(fastcps, "__version__", "unknown")}


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Short hash of HEAD, with "+dirty" when the working tree differs from it. ``FASTCPS_COMMIT``
    names it where the checkout has no .git (a copy of the tree on a rented GPU machine)."""
    if os.environ.get("FASTCPS_COMMIT"):
        return os.environ["FASTCPS_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def append_csv(path: Path | str, rows: list[dict], columns: list[str]) -> Path:
    """Append rows (header written for a new file); refuses a file whose header differs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise ValueError(
                f"{path} has columns {header}, expected {columns}; write to a new file "
                "(or move the old one aside)"
            )
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
