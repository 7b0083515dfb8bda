"""Checkpoints and exported weights of a run. ``<run>/checkpoints/<tag>/`` holds:

- DeepSpeed's checkpoint with the trainer's state (``*model_states.pt``; ZeRO: each rank's optimizer
  partition ``*zero_pp_rank_<r>_*optim_states.pt``; a LoRA run leaves the frozen base out),
- each rank's EMA (``ema_rank<r>.pt``, when ``train.ema_decay`` is set),
- the exported weights (``fastcps.checkpoint.export``): ``transformer/`` for full fine-tuning (diffusers'
  sharded layout), ``policy.safetensors`` + ``pytorch_lora_weights.safetensors`` for LoRA,
- ``complete.json``, written last: the marker that makes it count (``fastcps.checkpoint.complete``).

``latest`` names the newest complete one. A resume takes the newest complete checkpoint, whatever
``latest`` says, and logs the incomplete ones it skipped.

Every function that touches the engine is collective: all ranks call it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from fastcps import distributed as dist
from fastcps.checkpoint import complete, files
from fastcps.checkpoint.export import (
    MAX_SHARD_BYTES,
    ExportedWeights,
    export_weights,
    save_diffusers_lora,
)
from fastcps.checkpoint.shared import RunDirNotShared, check_run_dir_shared

__all__ = [
    "ExportedWeights",
    "RunDirNotShared",
    "check_run_dir_shared",
    "complete_checkpoint",
    "export_weights",
    "load_checkpoint",
    "save_checkpoint",
    "save_diffusers_lora",
    "set_aside_later_metrics",
]

log = logging.getLogger(__name__)


def save_checkpoint(
    engine,
    run_dir: Path,
    tag: str,
    client_state: dict,
    *,
    epoch: int,
    ema=None,
    policy_name: str,
    lora: bool,
    keep: int | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write checkpoint ``tag`` (``epoch``: the epochs done, for ordering) into ``<tag>.partial/``, mark
    it complete once every rank's files are on disk, rename it to ``<tag>`` and move ``latest``. With
    ``keep`` it is a periodic one and only the newest ``keep`` complete periodic checkpoints (``epoch*``)
    stay (``final`` and ``interrupted_*`` are never removed)."""
    root = Path(run_dir) / "checkpoints"
    staged = root / f"{tag}{complete.PARTIAL}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        complete.recover(root)  # a complete leftover of this tag is published, not overwritten
        if staged.exists():  # an incomplete one is
            log.info("removing %s: an earlier save of %s that did not finish", staged, tag)
            shutil.rmtree(staged, ignore_errors=True)
    dist.barrier()
    # A LoRA run's frozen base comes back from policy.pretrained: only the adapter, its optimizer state
    # and the trainer's go in (FLUX.1-dev's base would add ~24 GB to every checkpoint). `latest` is
    # ours to move, once the whole checkpoint is there.
    engine.save_checkpoint(
        str(root),
        tag=staged.name,
        client_state=client_state,
        exclude_frozen_parameters=lora,
        save_latest=False,
    )
    if ema is not None:
        torch.save(ema.state_dict(), staged / f"ema_rank{dist.rank()}.pt")
    export_weights(engine, policy_name, lora, staged, max_shard_bytes=max_shard_bytes)
    dist.barrier()  # every rank's last file is written
    complete.seal(staged, tag=tag, epoch=epoch, rank=dist.rank(), world=dist.world())
    if dist.is_main():
        complete.publish(root, tag)
        complete.prune(root, keep)
    dist.barrier()
    return root / tag


def complete_checkpoint(root: Path) -> tuple[complete.Found | None, list[complete.Found]]:
    """(the newest complete checkpoint under ``root`` or None, the incomplete ones), read-only."""
    found = complete.scan(root)
    return complete.newest_complete(found), [f for f in found if not f.complete]


def load_checkpoint(engine, run_dir: Path, *, ema=None, lora: bool = False) -> dict:
    """Load the newest complete checkpoint of ``run_dir``; returns the client state it was saved with.
    Rank 0 picks it (and logs the incomplete ones it skips), every rank loads the same tag. A LoRA
    run's checkpoint holds no frozen weights: the module loads non-strictly, the base staying as loaded."""
    root = Path(run_dir) / "checkpoints"
    choice = None
    if dist.is_main():
        if root.is_dir():
            complete.recover(root)
        newest, broken = complete_checkpoint(root)
        for f in broken:
            log.warning("--resume: skipping incomplete checkpoint %s (%s)", f.folder, f.why)
        if newest is None:
            what = "; ".join(f"{f.folder.name}: {f.why}" for f in broken) or "none at all"
            choice = {"error": f"--resume {run_dir}: no complete checkpoint under {root} ({what})"}
        else:
            log.info("--resume: loading checkpoint %s", newest.folder)
            choice = {"tag": newest.folder.name}
    choice = files.broadcast_object(choice)
    if "error" in choice:
        raise FileNotFoundError(choice["error"])
    tag = choice["tag"]
    path, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not lora)
    if path is None:
        raise RuntimeError(f"--resume {run_dir}: DeepSpeed could not load the checkpoint {root / tag}")
    if ema is not None:
        ema.load_state_dict(torch.load(root / tag / f"ema_rank{dist.rank()}.pt"))
    return client


def set_aside_later_metrics(run_dir: Path, epoch: int) -> None:
    """Metrics logged after the checkpoint a run resumes from will be logged again: keep the full log
    as ``metrics.before_resume_epochNNNNN.jsonl`` and cut ``metrics.jsonl`` back to ``epoch``."""
    log = Path(run_dir) / "metrics.jsonl"
    if not log.exists():
        return
    rows = [r for r in log.read_text().splitlines() if r.strip()]
    keep = [r for r in rows if json.loads(r)["epoch"] <= epoch]
    if len(keep) != len(rows):
        shutil.copy(log, log.with_name(f"metrics.before_resume_epoch{epoch:05d}.jsonl"))
        log.write_text("".join(r + "\n" for r in keep))
