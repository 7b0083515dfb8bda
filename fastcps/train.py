"""Entry point: ``deepspeed fastcps/train.py --config configs/digits_cps.json [--set k=v ...]``
(also ``python -m fastcps.train``). Reads top to bottom: config -> DeepSpeed -> Trainer.fit()."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file (`deepspeed fastcps/train.py`, `python fastcps/train.py`): Python put fastcps/ first on
    # sys.path, where this package's modules would stand in for installed distributions of the same names.
    # Become `python -u -m fastcps.train` before importing anything of ours (same process, environment and
    # arguments; -u: a launcher reads each rank's lines as they come).
    os.execv(sys.executable, [sys.executable, "-u", "-m", "fastcps.train", *sys.argv[1:]])

from fastcps.config import ConfigError, RunConfig, load_config, save_config, validate_tree  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GRPO with Coefficients-Preserving Sampling")
    p.add_argument("--config", help="JSON run config (configs/*.json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    p.add_argument(
        "--local_rank",
        type=int,
        default=int(os.environ.get("LOCAL_RANK", 0)),
        help="set by the deepspeed launcher",
    )
    return p.parse_args(argv)


def load_run_config(args) -> RunConfig:
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ConfigError(
                f"--resume {args.resume}: no config.json there (is it a fastcps run directory?)"
            )
        if args.config:
            raise ConfigError("give either --config or --resume: a resumed run keeps its saved config")
        return load_config(RunConfig, str(saved), args.overrides)
    if not args.config:
        raise ConfigError("--config is required, e.g. --config configs/digits_cps.json")
    return load_config(RunConfig, args.config, args.overrides)


def main(argv=None) -> int:
    from fastcps.allocator import enable_expandable_segments

    # before anything touches CUDA: the allocator reads its settings once (why: fastcps.allocator)
    enable_expandable_segments()
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_run_config(args)
        validate_tree(cfg, world_size=world)  # before any model loads
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from fastcps.logger import setup_logging

    setup_logging()  # the trainer's `[fastcps] ...` lines, rank 0 only

    from fastcps import distributed as dist
    from fastcps.rewards import RewardFailed
    from fastcps.trainer import NonFiniteStop, Trainer

    t0 = time.perf_counter()
    dist.init()
    run_dir = Path(args.resume) if args.resume else Path(cfg.output_dir) / cfg.name
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.json"
        if saved.exists():  # a resumed (or re-used) run: keep what was there
            saved.rename(run_dir / f"config.before_{time.strftime('%Y%m%d-%H%M%S')}.json")
        save_config(cfg, saved)
    dist.barrier()
    try:
        trainer = Trainer(cfg, run_dir)
        if args.resume:
            trainer.load_checkpoint(run_dir)
    except FileNotFoundError as err:  # weights, prompt files, DeepSpeed config: the message names the key
        print(f"[fastcps] {err}", file=sys.stderr, flush=True)
        return 2
    if args.resume:
        if dist.is_main():
            print(f"[fastcps] resumed {run_dir} at epoch {trainer.epoch}", flush=True)
    try:
        trainer.fit()
    except RewardFailed as err:
        print(f"[fastcps] stopped: {err}", file=sys.stderr, flush=True)
        return 3
    except NonFiniteStop as err:
        print(f"[fastcps] {err}", file=sys.stderr, flush=True)
        return 4
    if dist.is_main():
        print(f"[fastcps] done in {time.perf_counter() - t0:.1f} s", flush=True)
        print(where_things_are(run_dir, lora=cfg.policy.lora is not None), flush=True)
    return 0


def where_things_are(run_dir: Path, *, lora: bool) -> str:
    """The end of a run: where its outputs are and the command that shows the result."""
    ckpts = run_dir / "checkpoints"
    latest = ckpts / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    rows = [("run directory", f"{run_dir}  (config.json, metrics.jsonl, images/)")]
    if tag:
        rows.append(
            (
                "checkpoint" if tag != "final" else "final checkpoint",
                f"{ckpts / tag}  (policy.safetensors: the trained weights)",
            )
        )
        if lora:
            rows.append(
                (
                    "LoRA for diffusers",
                    f"{ckpts / tag / 'pytorch_lora_weights.safetensors'}  "
                    f'(pipe.load_lora_weights("{ckpts / tag}"))',
                )
            )
    if (run_dir / "reward_curve.png").is_file():
        rows.append(("reward curve", str(run_dir / "reward_curve.png")))
    if (run_dir / "tb").is_dir():
        rows.append(("TensorBoard", f"tensorboard --logdir {run_dir / 'tb'}"))
    if tag:
        pick = "" if tag == "final" else f" --checkpoint {tag}"
        rows.append(
            (
                "see the result",
                f"python -m fastcps.sample --run {run_dir}{pick} --out {run_dir / 'sample.png'}",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"[fastcps]   {k:<{width}}  {v}" for k, v in rows)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
