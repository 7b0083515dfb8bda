"""The command line of ``python -m fastcps.sample``: arguments, their checks, and the run from the inputs
to the grid. Exit codes: 0 done, 2 bad input (``UsageError``), 3 the run's rewards could not score."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastcps.sample.comparison import compare
from fastcps.sample.inputs import (
    UsageError,
    check_weights_file,
    chosen_prompts,
    load_run_config,
    resolve_checkpoint,
)
from fastcps.sample.outputs import print_means, write_outputs
from fastcps.samplers import SAMPLERS

EPILOG = """\
what is compared:
  base     the run's base model (policy.pretrained; for LoRA: the same model with its adapters off)
  trained  the checkpoint's exported weights (transformer/ for full fine-tuning, policy.safetensors for
           LoRA), gathered from ZeRO-3. These are the raw trained weights, not the EMA (train.ema_decay):
           EMA shadows are saved per rank as ZeRO-3 partitions (ema_rank<r>.pt) and this command does
           not read them.
  Every image of one prompt starts from the same initial noise in both rows (and, for stochastic
  samplers, the same seeded noise at every step).

  An editing run (kontext, qwenimage_edit) shows each prompt's source image(s) left of both rows: the
  base and the trained model edit the same source from the same noise.

outputs, beside --out (e.g. grid.png):
  grid.png           a row of base and a row of trained images per prompt, each image labelled with its
                     reward components and their weighted total (an edit: its source image beside them)
  grid_images/       every image, one PNG each (p00_base_0.png, p00_trained_0.png, ...; p00_source_0.png)
  grid.json, .csv    per-image rewards and the means

the same trained images from a stock diffusers pipeline (FLUX/SD3 with LoRA):
  pipe = FluxPipeline.from_pretrained("<policy.pretrained>")      # or StableDiffusion3Pipeline
  pipe.load_lora_weights("runs/<name>/checkpoints/final")         # reads pytorch_lora_weights.safetensors
  pipe(prompt, num_inference_steps=N, guidance_scale=<policy.guidance>, latents=x1)   # x1: packed noise
  SD3: guidance_scale=<policy.cfg_scale> (1 = none) and sigmas=numpy.linspace(1, 1/N, N) as fastcps uses.
  tests/test_sample.py checks that these give this command's trained images (tiny FLUX and SD3). Full
  fine-tuning: the checkpoint's transformer/ is a diffusers model folder (sharded safetensors, index,
  config.json), in the dtype it trained in:
  transformer = FluxTransformer2DModel.from_pretrained("runs/<name>/checkpoints/final/transformer")
  pipe = FluxPipeline.from_pretrained("<policy.pretrained>", transformer=transformer)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fastcps.sample",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Images of a trained run's checkpoint beside the base model's, from the same noise, "
        "scored "
        "by the run's rewards; prints the mean reward of base and trained.",
    )
    p.add_argument("--run", required=True, help="run directory (<output_dir>/<name>, holds config.json)")
    p.add_argument(
        "--checkpoint",
        metavar="TAG",
        help="checkpoint under <run>/checkpoints (default: final, else the newest complete one)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompts",
        metavar="FILE",
        help=".txt (one prompt a line) or .jsonl prompt file (default: the run's fixed eval prompts)",
    )
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="an editing run's source image for --prompt (once for all prompts, or once per --prompt)",
    )
    p.add_argument(
        "--images-per-prompt", type=int, default=4, metavar="K", help="images per prompt and row (4)"
    )
    p.add_argument(
        "--steps", type=int, help="sampling steps (default: the run's eval.num_steps, else sampler.num_steps)"
    )
    p.add_argument(
        "--sampler",
        default="ode",
        choices=sorted(SAMPLERS),
        help="ode (default, what eval uses) or a stochastic sampler (seeded noise)",
    )
    p.add_argument(
        "--eta",
        type=float,
        help="noise level of a stochastic sampler (default: the run's "
        "sampler.eta for its own sampler, else the sampler's default)",
    )
    p.add_argument("--seed", type=int, help="noise seed (default: the run's eval.seed: its eval images)")
    p.add_argument("--out", required=True, help="the grid's PNG path; the rest is written beside it")
    return p.parse_args(argv)


def validate(args) -> None:
    if args.images_per_prompt < 1:
        raise UsageError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if Path(args.out).suffix.lower() != ".png":
        raise UsageError(
            f"--out {args.out}: give a .png path (the grid); the images, JSON and CSV go beside it"
        )


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse already printed which argument; 0 for --help
        return int(exit_.code or 0)
    try:
        validate(args)
        cfg = load_run_config(args.run)
        checkpoint = resolve_checkpoint(args.run, args.checkpoint)
        weights = check_weights_file(checkpoint, cfg.policy.name)
        prompts, meta = chosen_prompts(args, cfg)
        return run(args, cfg, checkpoint, weights.path, prompts, meta)
    except UsageError as err:
        print(f"fastcps.sample: error: {err}", file=sys.stderr)
        return 2


def run(args, cfg, checkpoint: Path, weights: Path, prompts: list[str], meta: list[dict]) -> int:
    from fastcps.policies import build_policy
    from fastcps.rewards import RewardFailed, WeightedReward
    from fastcps.rollout import sampling_steps

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    steps = args.steps or cfg.eval.num_steps or cfg.sampler.num_steps
    eta = (
        args.eta if args.eta is not None else (cfg.sampler.eta if args.sampler == cfg.sampler.name else None)
    )
    seed = cfg.eval.seed if args.seed is None else args.seed
    try:
        policy = build_policy(cfg.policy, device)
        reward_fn = WeightedReward([(r.name, r.weight, r.args) for r in cfg.rewards])
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(
            f"--run {args.run}: its config.json names something that does not load: {err}"
        ) from err
    try:
        sampling = sampling_steps(args.sampler, eta, policy.sigmas(steps, device="cpu"))
    except ValueError as err:  # e.g. CPWS where its Wiener std exceeds σ'
        raise UsageError(f"--sampler {args.sampler} (--eta {eta}, --steps {steps}): {err}") from err
    try:
        c = compare(
            policy,
            checkpoint,
            prompts,
            meta,
            reward_fn,
            sampling,
            k=args.images_per_prompt,
            seed=seed,
            device=device,
        )
    except RewardFailed as err:
        print(f"fastcps.sample: the run's rewards could not score these prompts: {err}", file=sys.stderr)
        return 3
    info = {
        "run": str(args.run),
        "checkpoint": checkpoint.name,
        "weights": str(weights),
        "sampler": args.sampler,
        "eta": eta,
        "steps": steps,
        "seed": seed,
        "images_per_prompt": args.images_per_prompt,
    }
    out = Path(args.out)
    summary = write_outputs(c, out, info, reward_fn.weights)
    print(
        f"[fastcps.sample] {args.run} @ {checkpoint.name}: {len(prompts)} prompts x "
        f"{args.images_per_prompt} images, {args.sampler}, {steps} steps, seed {seed} (trained = "
        f"{weights.name}, not the EMA)"
    )
    print_means(summary["mean"])
    print(
        f"[fastcps.sample] wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.csv')}, "
        f"{out.with_name(out.stem + '_images')}/"
    )
    return 0
