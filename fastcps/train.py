"""Entry point: ``deepspeed fastcps/train.py --config configs/digits_cps.json [--set k=v ...]``
(also ``python -m fastcps.train``). Reads top to bottom: config -> DeepSpeed -> Trainer.fit()."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
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
    """Train; returns the exit code (``fastcps.distributed.Exit``: 0 done, 1 any other error, 2 config,
    missing file or launcher variables, 3 reward, 4 non-finite, 5 a rank vanished, 6 a collective timed
    out, 130 Ctrl-C twice). In a multi-process run an error on any rank ends every rank within seconds,
    each with the exit code of the rank that failed first and a line naming it (``fastcps.distributed.
    failure``); such a rank ends its process itself (``os._exit``: a broken process group cannot be torn
    down), a world of one returns the code."""
    from fastcps.allocator import enable_expandable_segments

    # before anything touches CUDA: the allocator reads its settings once (why: fastcps.allocator)
    enable_expandable_segments()
    args = parse_args(argv)
    from fastcps.config import DistributedConfig
    from fastcps.distributed import Exit, LaunchError, discover

    try:
        launch = discover(os.environ)
    except LaunchError as err:
        print(f"launch error: {err}", file=sys.stderr, flush=True)
        return Exit.CONFIG
    config_error, cfg = None, None
    try:
        # a resumed run's config.json is read once every rank is known to see its directory (_train)
        if not args.resume:
            cfg = load_run_config(args)
            validate_tree(cfg, world_size=launch.world)  # before any model loads
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        if launch.world == 1:
            return Exit.CONFIG
        # the other ranks may have read their config: they learn of this one through the channel
        cfg, config_error = None, f"config error: {err}"
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from fastcps.logger import setup_logging

    setup_logging()  # the trainer's `[fastcps] ...` lines, rank 0 only

    from fastcps import distributed as dist

    timeouts = cfg.distributed if cfg is not None else DistributedConfig()  # a resume: the defaults
    t0 = time.perf_counter()
    try:
        dist.init(timeout_s=timeouts.load_timeout_s, launch=launch)
    except Exception as err:  # no process group, no channel: this rank can only say why
        print(
            f"[fastcps] could not start the process group ({launch.describe()}): {type(err).__name__}: {err}",
            file=sys.stderr,
            flush=True,
        )
        return Exit.ERROR
    channel = dist.open_failure_channel(heartbeat_timeout_s=timeouts.heartbeat_timeout_s)
    try:
        if config_error is not None:
            channel.fail(Exit.CONFIG, config_error)
            return Exit.CONFIG
        code = _train(args, cfg, launch.world, t0)
    except (Exception, KeyboardInterrupt) as err:
        return _failed(err, channel)
    if channel is not None:
        channel.close(wait_s=timeouts.step_timeout_s)
    return code


def _train(args, cfg: RunConfig | None, world: int, t0: float) -> int:
    from fastcps import distributed as dist
    from fastcps.checkpoint import check_run_dir_shared
    from fastcps.trainer import Trainer

    run_dir = Path(args.resume) if args.resume else Path(cfg.output_dir) / cfg.name
    # before any rank reads what rank 0 alone writes there (config.json, latest, markers); raises
    # RunDirNotShared (exit 2) on every rank when one cannot see it
    check_run_dir_shared(
        run_dir, rank=dist.rank(), world=dist.world(), what="--resume" if args.resume else "output_dir"
    )
    if args.resume:
        cfg = load_run_config(args)  # every rank reads the same config.json
        validate_tree(cfg, world_size=world)
        dist.set_collective_timeout(cfg.distributed.load_timeout_s)
        dist.barrier()  # every rank has read it before rank 0 renames it
    if dist.is_main():
        saved = run_dir / "config.json"
        if saved.exists():  # a resumed (or re-used) run: keep what was there
            saved.rename(run_dir / f"config.before_{time.strftime('%Y%m%d-%H%M%S')}.json")
        save_config(cfg, saved)
    dist.barrier()
    trainer = Trainer(cfg, run_dir)
    if args.resume:
        trainer.load_checkpoint(run_dir)
        if dist.is_main():
            print(f"[fastcps] resumed {run_dir} at epoch {trainer.epoch}", flush=True)
    trainer.fit()
    if dist.is_main():
        print(f"[fastcps] done in {time.perf_counter() - t0:.1f} s", flush=True)
        print(where_things_are(run_dir, lora=cfg.policy.lora is not None), flush=True)
    return 0


def _failed(err: BaseException, channel) -> int:
    """Say what ended this rank, with the exit code its kind has; in a multi-process run, tell the others
    through the channel (or, when ``err`` only echoes another rank's trouble, report that rank's cause)."""
    code, line, message, of_peer = classify(err)
    if code == 1 and channel is None:
        raise err  # a world of one: Python's traceback and exit 1, as ever
    if code == 1:
        traceback.print_exception(err, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)
    if channel is None:
        if isinstance(err, KeyboardInterrupt):
            raise err
        return code
    channel.fail(code, message, symptom_of_peer=of_peer)  # ends the process
    return code


def classify(err: BaseException) -> tuple[int, str, str, bool]:
    """(exit code, the line this rank prints, the message the other ranks print, whether ``err`` is only
    the echo of another rank's trouble: a closed connection, a collective timeout)."""
    from fastcps import distributed as dist
    from fastcps.distributed import Exit
    from fastcps.rewards import RewardFailed
    from fastcps.trainer import NonFiniteStop

    text = f"{err}"[:2000]
    if isinstance(err, ConfigError):  # a resumed run's saved config
        return Exit.CONFIG, f"config error: {text}", f"config error: {text}", False
    if isinstance(err, FileNotFoundError):  # weights, prompts, DeepSpeed JSON: the message names the key
        return Exit.CONFIG, f"[fastcps] {text}", text, False
    if isinstance(err, RewardFailed):
        return Exit.REWARD, f"[fastcps] stopped: {text}", text, False
    if isinstance(err, NonFiniteStop):
        return Exit.NONFINITE, f"[fastcps] {text}", text, False
    if isinstance(err, KeyboardInterrupt):
        return Exit.INTERRUPTED, "[fastcps] interrupted (Ctrl-C)", "interrupted (Ctrl-C)", False
    echo = dist.symptom(err)
    first = text.splitlines()[0] if text else type(err).__name__
    if echo == Exit.COLLECTIVE_TIMEOUT:
        t = dist.current_timeout_s()
        message = (
            f"a collective timed out{f' after {t:g} s' if t else ''} (distributed.step_timeout_s in "
            f"the training loop, load_timeout_s while loading or saving): another rank is stuck or far "
            f"slower ({first})"
        )
        return echo, f"[fastcps] {message}", message, True
    if echo == Exit.PEER_VANISHED:
        message = f"lost a peer ({type(err).__name__}: {first})"
        return echo, f"[fastcps] {message}", message, True
    return (
        Exit.ERROR,
        f"[fastcps] error: {type(err).__name__}: {text}",
        f"{type(err).__name__}: {text}",
        False,
    )


def where_things_are(run_dir: Path, *, lora: bool) -> str:
    """The end of a run: where its outputs are and the command that shows the result."""
    ckpts = run_dir / "checkpoints"
    latest = ckpts / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    rows = [("run directory", f"{run_dir}  (config.json, metrics.jsonl, images/)")]
    if tag:
        weights = (
            "policy.safetensors: the trained weights"
            if lora
            else "transformer/: the trained transformer, for diffusers' from_pretrained"
        )
        rows.append(("checkpoint" if tag != "final" else "final checkpoint", f"{ckpts / tag}  ({weights})"))
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
