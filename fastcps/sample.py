"""Look at a trained run: base model vs trained model, from the same noise, scored by the run's rewards.

    python -m fastcps.sample --run runs/digits_cps --out grid.png

Sampling is the trainer's own (``fastcps.rollout``: ``sampling_steps``, ``initial_noise``, ``sample``,
``PromptEncodings``; the policy's ``decode``), so the images are the ones the trainer's eval sees: with
the default prompts, seed and ``--images-per-prompt`` = ``eval.images_per_prompt`` the printed means
are the run's ``eval/<reward>`` at epoch 0 (base) and at the checkpoint (trained, unless EMA is on).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

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

outputs, beside --out (e.g. grid.png):
  grid.png           a row of base and a row of trained images per prompt, each image labelled with its
                     reward components and their weighted total
  grid_images/       every image, one PNG each (p00_base_0.png, p00_trained_0.png, ...)
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


class UsageError(Exception):
    """Bad input; the message names the argument. Exit code 2."""


# --- the run, its checkpoint, its prompts -----------------------------------------------------------


def load_run_config(run: str):
    from fastcps.config import RunConfig
    from fastcps.config import ConfigError, load_config

    path = Path(run)
    if not path.is_dir():
        raise UsageError(
            f"--run {run}: no such run directory (runs are made by `deepspeed fastcps/train.py "
            "--config ...` under <output_dir>/<name>)"
        )
    if not (path / "config.json").is_file():
        raise UsageError(f"--run {run}: no config.json there, so it is not a fastcps run directory")
    try:
        return load_config(RunConfig, str(path / "config.json"))
    except (ConfigError, ValueError) as err:
        raise UsageError(f"--run {run}: its config.json does not load: {err}") from err


def resolve_checkpoint(run: str, tag: str | None) -> Path:
    """<run>/checkpoints/<tag>, a complete checkpoint (``fastcps.checkpoint.complete``); default ``final``,
    else the newest complete one."""
    from fastcps.checkpoint import complete

    root = Path(run) / "checkpoints"
    found = {f.folder.name: f for f in complete.scan(root)}
    done = sorted(name for name, f in found.items() if f.complete)
    if tag is None:
        newest = complete.newest_complete(list(found.values()))
        tag = "final" if "final" in done else (newest.folder.name if newest else None)
        if tag is None:
            raise UsageError(f"--run {run}: no complete checkpoint under {root} yet")
    if tag not in done:
        why = f" is incomplete ({found[tag].why})" if tag in found else ": no such checkpoint"
        have = ", ".join(done) if done else "none"
        raise UsageError(f"--checkpoint {tag}{why}; checkpoints of this run: {have}")
    return root / tag


def check_weights_file(checkpoint: Path, family: str):
    """The checkpoint's export is fastcps's and was written for this policy family (before any model
    loads); returns it (``fastcps.checkpoint.ExportedWeights``)."""
    from fastcps.checkpoint import ExportedWeights

    try:
        weights = ExportedWeights(checkpoint)
        meta = weights.metadata
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise UsageError(f"--checkpoint: {checkpoint} holds no readable exported weights ({err})") from err
    path = weights.path
    if meta.get("format") != "fastcps-policy-weights":
        raise UsageError(
            f"--checkpoint: {path} is not fastcps's policy export (metadata format={meta.get('format')!r})"
        )
    if meta.get("policy") != family:
        raise UsageError(
            f"--run / --checkpoint: {path} holds weights of a {meta.get('policy')!r} policy, but the "
            f"run's config.json says policy.name = {family!r}; pick the run that wrote this checkpoint"
        )
    return weights


def run_prompts(cfg) -> tuple[list[str], list[dict]]:
    """The run's fixed eval set, as the trainer picks it (``rollout.eval_prompt_set``)."""
    from fastcps.rollout import eval_prompt_set

    try:
        return eval_prompt_set(cfg)
    except (FileNotFoundError, ValueError) as err:  # e.g. a relative path from another working directory
        source = cfg.prompts.eval_source or cfg.prompts.source
        raise UsageError(
            f"the run's eval prompts ({source!r}) do not load: {err}. Give --prompts FILE or --prompt TEXT"
        ) from err


def chosen_prompts(args, cfg) -> tuple[list[str], list[dict]]:
    from fastcps.prompts import load_prompts

    if args.prompt:
        return list(args.prompt), [{} for _ in args.prompt]
    if args.prompts:
        if Path(args.prompts).suffix not in (".txt", ".jsonl"):
            raise UsageError(
                f"--prompts {args.prompts}: give a .txt file (one prompt a line) or a .jsonl file "
                '({"prompt": ..., "metadata": {...}} a line), see configs/prompts/README.md'
            )
        try:
            return load_prompts(args.prompts)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--prompts {args.prompts}: {err}") from err
    return run_prompts(cfg)


def check_trained(model: torch.nn.Module, weights) -> None:
    """The export holds every trained parameter of the model and nothing the model lacks (names and
    shapes; a full fine-tuning export holds the whole state dict): checked before any image is made."""
    path = weights.path
    state = dict(model.state_dict(keep_vars=True))
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    have = set(weights.keys())
    extra, missing = sorted(have - set(state)), sorted(want - have)
    if extra or missing:
        raise UsageError(
            f"--checkpoint: {path} does not match this run's trained parameters ({len(extra)} unexpected, "
            f"e.g. {extra[:2]}; {len(missing)} missing, e.g. {missing[:2]}): was it written with this "
            "config.json (policy.lora)?"
        )
    for name in sorted(have):
        if weights.shape(name) != tuple(state[name].shape):
            raise UsageError(
                f"--checkpoint: {path}: {name} has shape {weights.shape(name)}, the model's "
                f"{tuple(state[name].shape)}"
            )


@torch.no_grad()
def load_trained(model: torch.nn.Module, weights) -> None:
    """Copy the export into the model's tensors of the same names, one tensor at a time (a full FLUX
    export does not fit twice in host memory)."""
    state = dict(model.state_dict(keep_vars=True))
    for name in weights.keys():
        state[name].copy_(weights.get(name))


# --- sampling and scoring ---------------------------------------------------------------------------


@dataclass
class Comparison:
    prompts: list[str]
    images: dict[str, torch.Tensor]  # "base" / "trained" -> (P, K, 3, H, W) in [0, 1], CPU
    total: dict[str, torch.Tensor]  # -> (P, K) weighted reward
    components: dict[str, dict[str, torch.Tensor]]  # -> reward name -> (P, K)


@torch.no_grad()
def generate(
    policy, model, encodings, prompts: list[str], sampling, *, k: int, seed: int, device
) -> torch.Tensor:
    """(P, K, 3, H, W): every prompt's K images with ``sampling``; noise seeded by (seed, prompt, image)."""
    from fastcps.rollout import eval_noise, sample
    from fastcps.runtime import derive_seed

    step_seeds = [derive_seed(seed, 6, i) for i in range(len(sampling.coeffs))]
    out = []
    for p, prompt in enumerate(prompts):
        cond, _ = encodings.for_prompts([prompt], device)
        x1 = eval_noise(policy, seed, p, k, device)
        final = sample(policy, model, cond, x1, sampling, step_seeds=step_seeds, first_index=p * k).final
        out.append(policy.decode(final).float().cpu())
    return torch.stack(out)


def compare(
    policy,
    checkpoint: Path,
    prompts: list[str],
    meta: list[dict],
    reward_fn,
    sampling,
    *,
    k: int,
    seed: int,
    device,
) -> Comparison:
    """Base images, then trained images (``checkpoint``'s exported weights) from the same noise, and
    their rewards. LoRA: one model with its adapters off, then on. Full fine-tuning: the trained weights
    overwrite the base in place."""
    from fastcps.checkpoint import ExportedWeights
    from fastcps.rollout import PromptEncodings

    weights = ExportedWeights(checkpoint)

    device = torch.device(device)
    sampling = sampling._replace(trained=[]).to(device)  # nothing to keep for an update
    encodings = PromptEncodings(policy)
    model = policy.transformer.eval()
    check_trained(model, weights)
    run = lambda m: generate(policy, m, encodings, prompts, sampling, k=k, seed=seed, device=device)  # noqa: E731
    if policy.lora:
        load_trained(model, weights)
        with policy.reference(model) as base_model:
            base = run(base_model)
    else:
        base = run(model)
        load_trained(model, weights)
    images = {"base": base, "trained": run(model)}
    total, comps = {}, {}
    for which, imgs in images.items():
        rows = [reward_fn(imgs[p], [prompts[p]] * k, [meta[p]] * k) for p in range(len(prompts))]
        total[which] = torch.stack([r.total for r in rows])
        comps[which] = {n: torch.stack([r.components[n] for r in rows]) for n in rows[0].components}
    return Comparison(prompts, images, total, comps)


def means(c: Comparison) -> dict[str, dict[str, float]]:
    return {
        w: {"total": float(c.total[w].mean()), **{n: float(v.mean()) for n, v in c.components[w].items()}}
        for w in c.images
    }


# --- the grid and the files beside it ----------------------------------------------------------------


def to_pil(img: torch.Tensor):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def draw_block(c: Comparison, p: int, names: list[str], show_total: bool, cell: int, font):
    """One prompt: its text, a base row and a trained row; under every image its reward components
    (and the weighted total when it differs from the single component)."""
    from PIL import Image, ImageDraw

    line, pad, label_w = 16, 6, 84
    k = c.images["base"].shape[1]
    caption = line * (len(names) + show_total)
    width = label_w + k * (cell + pad)
    head = textwrap.wrap(c.prompts[p], max(20, int(width / 7.5)))[:3] or [""]
    height = len(head) * line + pad + 2 * (cell + caption + pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(head):
        draw.text((pad, i * line), text, fill="black", font=font)
    y = len(head) * line + pad
    for which in ("base", "trained"):
        draw.text((pad, y + cell // 2 - line), which, fill="black", font=font)
        draw.text(
            (pad, y + cell // 2), f"mean {float(c.total[which][p].mean()):.3f}", fill=(90, 90, 90), font=font
        )
        for j in range(k):
            x = label_w + j * (cell + pad)
            img.paste(to_pil(c.images[which][p, j]).resize((cell, cell), Image.NEAREST), (x, y))
            rows = [f"{n} {float(c.components[which][n][p, j]):.3f}" for n in names]
            rows += [f"total {float(c.total[which][p, j]):.3f}"] if show_total else []
            for r, text in enumerate(rows):
                draw.text((x, y + cell + 1 + r * line), text, fill="black", font=font)
        y += cell + caption + pad
    return img


def draw_grid(c: Comparison, weights: dict[str, float], title: str):
    """Every prompt's block (``draw_block``), tiled in columns so that the grid is about as wide as it
    is tall. Small images (the toy's 16 px) are enlarged without smoothing."""
    from PIL import Image, ImageDraw, ImageFont

    side = c.images["base"].shape[-1]
    cell = side * math.ceil(128 / side) if side < 128 else min(side, 256)
    names = list(c.components["base"])
    show_total = len(names) > 1 or weights[names[0]] != 1
    font = ImageFont.load_default(size=13)
    blocks = [draw_block(c, p, names, show_total, cell, font) for p in range(len(c.prompts))]
    bw, bh = max(b.width for b in blocks), max(b.height for b in blocks)
    cols = max(1, min(len(blocks), round(math.sqrt(len(blocks) * bh / bw))))
    rows = math.ceil(len(blocks) / cols)
    gap, top = 12, 28
    grid = Image.new("RGB", (cols * (bw + gap) + gap, top + rows * (bh + gap)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((gap, 6), title, fill="black", font=font)
    for i, block in enumerate(blocks):
        x, y = gap + (i % cols) * (bw + gap), top + (i // cols) * (bh + gap)
        draw.line([(x, y - gap // 2), (x + bw, y - gap // 2)], fill=(180, 180, 180))
        grid.paste(block, (x, y))
    return grid


def write_outputs(c: Comparison, out: Path, info: dict, weights: dict[str, float]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.with_name(out.stem + "_images")
    img_dir.mkdir(exist_ok=True)
    names = list(c.components["base"])
    rows = []
    for p, prompt in enumerate(c.prompts):
        for which in ("base", "trained"):
            for j in range(c.images[which].shape[1]):
                file = img_dir / f"p{p:02d}_{which}_{j}.png"
                to_pil(c.images[which][p, j]).save(file)
                rows.append(
                    {
                        "prompt_index": p,
                        "prompt": prompt,
                        "model": which,
                        "image": j,
                        "file": str(file),
                        "total": float(c.total[which][p, j]),
                        **{n: float(c.components[which][n][p, j]) for n in names},
                    }
                )
    summary = {**info, "rewards": weights, "mean": means(c), "images": rows}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = (
        f"{info['run']} @ {info['checkpoint']}: {info['sampler']}, {info['steps']} steps, seed "
        f"{info['seed']}; "
        "base vs trained from the same noise"
    )
    draw_grid(c, weights, title).save(out)
    return summary


def print_means(m: dict[str, dict[str, float]]) -> None:
    keys = list(m["base"])
    w = max(10, *(len(k) for k in keys)) + 2
    print(f"{'mean reward':<16}" + "".join(f"{k:>{w}}" for k in keys))
    for which in ("base", "trained"):
        print(f"  {which:<14}" + "".join(f"{m[which][k]:>{w}.4f}" for k in keys))
    print(f"  {'trained - base':<14}" + "".join(f"{m['trained'][k] - m['base'][k]:>+{w}.4f}" for k in keys))


# --- command line -----------------------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
