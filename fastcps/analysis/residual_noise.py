"""Residual noise in the final toy samples, per sampler and number of steps.

Every sampler starts from the same x1 and draws the same ε at every step (shared generators), on the
shipped digits policy, with the toy's schedule (``policy.sigmas(N)``, shift 1). Two measures of the
noise left in the images (decoded to [0, 1], what the reward sees):

- ``hf_ratio``: high-frequency energy, the power of the 2-D FFT at radial frequency above half of
  Nyquist (|k| > 0.25 cycles/pixel) of each mean-removed 16×16 image, mean over images, divided by
  the same for the ODE samples from the same x1. 1 = as clean as the ODE; > 1 = leftover noise.
- ``accuracy``: the digit classifier's (``DigitReward``) argmax equals the prompt's digit; and the
  mean ``digit`` reward (its softmax probability) for reference.

Also printed: each sampler's total noise level ``sqrt(a1² + s²)`` at the last step, the noise the
schedule does not remove (0 for ODE and CPS).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastcps.samplers import step_coeffs

__all__ = ["DEFAULT_SAMPLERS", "high_freq_energy", "main", "residual_noise", "sample_with"]

DEFAULT_SAMPLERS = (
    ("ode", None),
    ("cps", 0.2),
    ("cps", 0.5),
    ("cps", 0.8),
    ("cps", 1.0),
    ("flow_sde", 0.7),
    ("dance_sde", 0.3),
)


def high_freq_energy(images: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Per-image power at radial frequency > ``cutoff`` cycles/pixel (Nyquist = 0.5), [B].
    ``images``: [B, C, H, W]; channels are averaged first."""
    x = images.float().mean(1)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    f = torch.fft.fft2(x, norm="ortho")
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.fftfreq(w)[None, :]
    mask = (fy**2 + fx**2).sqrt() > cutoff
    return (f.abs() ** 2 * mask).sum(dim=(-2, -1))


@torch.no_grad()
def sample_with(policy, cond, x1: torch.Tensor, sigmas: torch.Tensor, sampler: str, eta, eps) -> torch.Tensor:
    """Final latents of ``sampler`` from x1 with the given per-step noises (plain step math)."""
    x = x1.clone()
    b = x.shape[0]
    for i in range(len(sigmas) - 1):
        c = step_coeffs(sampler, sigmas[i], sigmas[i + 1], eta, sigma_max=sigmas[1])
        v = policy.velocity(policy.transformer, x, sigmas[i].expand(b), cond).float()
        x = float(c.alpha[0]) * x + float(c.beta[0]) * v + float(c.s[0]) * eps[i]
    return x


def _label(sampler: str, eta) -> str:
    return sampler if eta is None else f"{sampler} η{eta:g}"


@torch.no_grad()
def residual_noise(
    steps=(4, 6, 10), samplers=DEFAULT_SAMPLERS, noises_per_digit: int = 24, seed: int = 0, policy=None
) -> list[dict]:
    from fastcps.policies.toy import ToyDigitsPolicy
    from fastcps.rewards.digit import DigitReward
    from fastcps.toy.digits import prompt_for

    policy = policy or ToyDigitsPolicy()
    policy.transformer.eval()
    reward = DigitReward()
    digits = [d for d in range(10) for _ in range(noises_per_digit)]
    prompts = [prompt_for(d, k) for d in range(10) for k in range(noises_per_digit)]
    target = torch.tensor(digits)
    cond = policy.encode(prompts)
    b = len(prompts)
    rows = []
    for n in steps:
        sigmas = policy.sigmas(n)
        x1 = policy.initial_noise(b, generator=torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed + 1000 + n)
        eps = [torch.randn(x1.shape, generator=gen) for _ in range(n)]
        hf_ode = None
        for name, eta in samplers:
            images = policy.decode(sample_with(policy, cond, x1, sigmas, name, eta, eps))
            hf = float(high_freq_energy(images).mean())
            if name == "ode":
                hf_ode = hf
            probs = reward.probabilities(images)
            last = step_coeffs(name, sigmas[-2], sigmas[-1], eta, sigma_max=sigmas[1])
            rows.append(
                {
                    "steps": n,
                    "sampler": name,
                    "eta": eta,
                    "label": _label(name, eta),
                    "hf_energy": hf,
                    "hf_ratio": hf / hf_ode if hf_ode else float("nan"),
                    "accuracy": float((probs.argmax(1) == target).float().mean()),
                    "reward": float(probs.gather(1, target[:, None]).mean()),
                    "last_step_noise": math.hypot(float(last.a1[0]), float(last.s[0])),
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    steps = sorted({r["steps"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["steps"]): r for r in rows}
    head = (
        "| sampler | "
        + " | ".join(f"HF ratio @{n}" for n in steps)
        + " | "
        + " | ".join(f"accuracy @{n}" for n in steps)
        + " | "
        + " | ".join(f"reward @{n}" for n in steps)
        + " | "
        + " | ".join(f"last-step noise @{n}" for n in steps)
        + " |"
    )
    lines = [head, "|" + "---|" * (1 + 4 * len(steps))]
    for lab in labels:
        cells = [f"{by[(lab, n)]['hf_ratio']:.2f}" for n in steps]
        cells += [f"{by[(lab, n)]['accuracy']:.3f}" for n in steps]
        cells += [f"{by[(lab, n)]['reward']:.3f}" for n in steps]
        cells += [f"{by[(lab, n)]['last_step_noise']:.3f}" for n in steps]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["steps"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for lab in labels:
        style = "--" if lab.startswith(("flow", "dance")) else "-"
        for ax, key in zip(axes, ("hf_ratio", "accuracy")):
            ax.plot(steps, [by[(lab, n)][key] for n in steps], style, marker="o", label=lab)
    axes[0].set_ylabel("high-frequency energy / ODE's")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("digit classifier accuracy")
    for ax in axes:
        ax.set_xlabel("number of steps")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Residual noise in final toy samples (same x1 and ε for every sampler)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grids(policy, path: str | Path, n: int = 4, seed: int = 0, samplers=DEFAULT_SAMPLERS) -> None:
    """One row per sampler: the same 10 prompts (one per digit) at ``n`` steps."""
    from fastcps.toy.digits import prompt_for
    from fastcps.toy.evaluate import save_grid

    prompts = [prompt_for(d) for d in range(10)]
    cond = policy.encode(prompts)
    sigmas = policy.sigmas(n)
    x1 = policy.initial_noise(10, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1000 + n)
    eps = [torch.randn(x1.shape, generator=gen) for _ in range(n)]
    imgs = [policy.decode(sample_with(policy, cond, x1, sigmas, s, e, eps)) for s, e in samplers]
    save_grid(torch.cat(imgs), str(path), nrow=10)


def main(
    out_dir: str | Path = "docs/figures",
    steps=(4, 6, 10),
    noises_per_digit: int = 24,
    grid_steps: int | None = 4,
) -> list[dict]:
    from fastcps.policies.toy import ToyDigitsPolicy

    torch.set_num_threads(1)
    policy = ToyDigitsPolicy()
    rows = residual_noise(steps, noises_per_digit=noises_per_digit, policy=policy)
    print(
        f"Residual noise: toy digits policy, {10 * noises_per_digit} samples per cell, same x1 and ε for "
        "every sampler; HF ratio = high-frequency energy / ODE's"
    )
    print(format_table(rows))
    out = Path(out_dir)
    plot(rows, out / "residual_noise.png")
    print(f"\nwrote {out / 'residual_noise.png'}")
    if grid_steps:
        save_grids(policy, out / f"residual_noise_samples_{grid_steps}steps.png", grid_steps)
        print(
            f"wrote {out / f'residual_noise_samples_{grid_steps}steps.png'} (rows: "
            + ", ".join(_label(s, e) for s, e in DEFAULT_SAMPLERS)
            + ")"
        )
    return rows
