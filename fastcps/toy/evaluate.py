"""ODE evaluation of a toy policy: ``python -m fastcps.toy.evaluate [--weights P] [--steps 8]``.

``eval/digit`` = mean ``digit`` reward of deterministic Euler (ODE) samples from fixed noises:
10 digits × ``noises_per_digit`` samples (sample k of digit d uses prompt template k mod 4),
initial noise from ``torch.Generator().manual_seed(seed)``. The shipped base scores ~0.5 at 8 steps
(see ``fastcps/assets/toy_digits_base.safetensors`` metadata ``eval_digit``), leaving room for RL.
"""

from __future__ import annotations

import argparse

import torch

from fastcps.samplers import step_coeffs
from fastcps.toy.digits import prompt_for

__all__ = ["eval_prompts", "evaluate_digit", "main", "ode_sample"]


@torch.no_grad()
def ode_sample(
    policy,
    prompts: list[str],
    noise: torch.Tensor,
    num_steps: int,
    model: torch.nn.Module | None = None,
    cond=None,
) -> torch.Tensor:
    """Euler (ODE) sampling from ``noise`` [B, *latent_shape]: x' = α·x + β·v with
    ``step_coeffs("ode", σ, σ')``. Returns the final latents (σ = 0)."""
    model = policy.transformer if model is None else model
    cond = policy.encode(prompts) if cond is None else cond
    sigmas = policy.sigmas(num_steps, device=noise.device)
    x = noise.float()
    b = x.shape[0]
    view = (b,) + (1,) * (x.ndim - 1)
    for i in range(num_steps):
        sig, nxt = sigmas[i], sigmas[i + 1]
        v = policy.velocity(model, x, sig.expand(b), cond).float()
        c = step_coeffs("ode", sig, nxt, batch_size=b, device=x.device)
        x = c.alpha.view(view) * x + c.beta.view(view) * v
    return x


def eval_prompts(noises_per_digit: int = 4) -> list[str]:
    return [prompt_for(d, k) for d in range(10) for k in range(noises_per_digit)]


@torch.no_grad()
def evaluate_digit(
    policy,
    num_steps: int = 8,
    noises_per_digit: int = 4,
    seed: int = 0,
    reward=None,
    model: torch.nn.Module | None = None,
) -> dict:
    """{"eval/digit": mean, "eval/digit_per_digit": [10 means], "images": [B,3,16,16]}."""
    from fastcps.rewards.digit import DigitReward

    reward = reward or DigitReward()
    prompts = eval_prompts(noises_per_digit)
    noise = policy.initial_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    images = policy.decode(ode_sample(policy, prompts, noise, num_steps, model=model))
    r = reward(images, prompts, [{"digit": d} for d in range(10) for _ in range(noises_per_digit)])
    return {
        "eval/digit": float(r.mean()),
        "eval/digit_per_digit": r.view(10, -1).mean(1).tolist(),
        "images": images,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="toy weights (default: the shipped base)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--noises-per-digit", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default=None, help="write the samples as a PNG grid here")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from fastcps.policies.toy import ToyDigitsPolicy

    policy = ToyDigitsPolicy(args.weights)
    out = evaluate_digit(policy, args.steps, args.noises_per_digit, args.seed)
    per = " ".join(f"{d}:{p:.2f}" for d, p in enumerate(out["eval/digit_per_digit"]))
    print(
        f"eval/digit {out['eval/digit']:.4f}  (steps {args.steps}, {10 * args.noises_per_digit} samples, "
        f"seed {args.seed})  per digit {per}"
    )
    if args.grid:
        save_grid(out["images"], args.grid, nrow=args.noises_per_digit)


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 4) -> None:
    """Rows of ``nrow`` images (one row per digit), upscaled ``scale``× with nearest neighbours."""
    import numpy as np
    from PIL import Image

    b, c, h, w = images.shape
    rows = b // nrow
    g = images[: rows * nrow].view(rows, nrow, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, nrow * w, c)
    arr = (g.clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(np.ascontiguousarray(arr)).resize(
        (nrow * w * scale, rows * h * scale), Image.NEAREST
    ).save(path)


if __name__ == "__main__":
    main()
