"""Checkpoints and exported weights of a run: ``<run>/checkpoints/<tag>/`` holds DeepSpeed's (ZeRO-3
partitioned) checkpoint with the trainer's state, each rank's EMA, ``policy.safetensors`` (the trained
parameters, gathered) and, for LoRA, ``pytorch_lora_weights.safetensors`` in diffusers' format.

Every function that touches the engine is collective: all ranks call it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fastcps import distributed as dist


def save_diffusers_lora(state: dict[str, torch.Tensor], peft_config, path: Path) -> None:
    """peft adapter weights as stock diffusers writes them (``save_lora_weights``): keys
    ``transformer.<module>.lora_A.weight`` and the adapter's LoraConfig (r, lora_alpha, targets) in the
    ``lora_adapter_metadata`` header. Without that header ``load_lora_weights`` assumes alpha = r and
    would scale the update by r / alpha (off by 2x for r 64, alpha 128)."""
    from safetensors.torch import save_file

    tensors = {"transformer." + n.replace(".default", ""): t for n, t in state.items()}
    meta = {
        f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()
    }
    save_file(
        tensors,
        str(path),
        metadata={
            "format": "pt",
            "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True, default=str),
        },
    )


def export_weights(engine, policy_name: str, lora: bool, path: Path) -> None:
    """The trained parameters as one safetensors file, gathered from the ZeRO-3 partitions
    (rank 0 writes), plus the diffusers LoRA file beside it for a LoRA policy."""
    import deepspeed
    from safetensors.torch import save_file

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if dist.is_main():
            state = {n: p.detach().to("cpu", torch.float32).contiguous().clone() for n, p in named}
            save_file(state, str(path), metadata={"format": "fastcps-policy-weights", "policy": policy_name})
            if lora:  # diffusers' LoRA format: pipeline.load_lora_weights(folder) reads it
                save_diffusers_lora(
                    state,
                    engine.module.peft_config["default"],
                    path.with_name("pytorch_lora_weights.safetensors"),
                )


def save_checkpoint(
    engine,
    run_dir: Path,
    tag: str,
    client_state: dict,
    *,
    ema=None,
    policy_name: str,
    lora: bool,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``tag``; with ``keep``, it is a periodic one and only the newest ``keep``
    periodic checkpoints (``epoch*``) stay (others, like ``final``, are never removed)."""
    root = Path(run_dir) / "checkpoints"
    # A LoRA run's frozen base comes back from policy.pretrained: only the adapter, its optimizer state
    # and the trainer's go in (FLUX.1-dev's base would add ~24 GB to every checkpoint).
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, exclude_frozen_parameters=lora)
    if ema is not None:
        torch.save(ema.state_dict(), root / tag / f"ema_rank{dist.rank()}.pt")
    export_weights(engine, policy_name, lora, root / tag / "policy.safetensors")
    dist.barrier()
    if dist.is_main() and keep is not None:
        tags = sorted(p.name for p in root.glob("epoch*") if p.is_dir())
        for old in tags[: max(0, len(tags) - keep)]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load_checkpoint(engine, run_dir: Path, *, ema=None, lora: bool = False) -> dict:
    """Load the latest checkpoint of ``run_dir``; returns the client state it was saved with. A LoRA
    run's checkpoint holds no frozen weights: the module loads non-strictly, the base staying as loaded."""
    root = Path(run_dir) / "checkpoints"
    if not (root / "latest").is_file():
        raise FileNotFoundError(
            f"--resume {run_dir}: no DeepSpeed checkpoint under {root} (missing 'latest')"
        )
    path, client = engine.load_checkpoint(str(root), load_module_strict=not lora)
    if path is None:
        raise RuntimeError(f"--resume {run_dir}: DeepSpeed could not load the checkpoint in {root}")
    if ema is not None:
        tag = (root / "latest").read_text().strip()
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
