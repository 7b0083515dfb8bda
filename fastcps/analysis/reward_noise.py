"""How the toy rewards respond to noise: ``digit`` (classifier trained with pixel-noise augmentation)
vs ``digit_clean_trained`` (same architecture, trained on clean images only).

Two measurements, both on CPU and deterministic (fixed generators):

- **added noise**: the 360 held-out digits of the toy's data (never seen by either classifier), with
  Gaussian noise of std ``level`` added in the latent/classifier space [-1, 1] (the space the samplers'
  residual noise lives in), decoded like the policy's images (to [0, 1], clamped); mean reward per level.
- **rollouts of the untrained base policy** at the training config's 8 steps: ODE, CPS η 0.8,
  Flow-SDE η 0.7, Dance-SDE η 0.3 (the study's samplers and η), the same x1 and per-step ε for every
  sampler; mean reward of each under each classifier (± s.e.m.), its paired difference to the ODE
  sample from the same x1, and the high-frequency energy ratio to the ODE samples
  (``residual_noise.high_freq_energy``).

``python -m fastcps.analysis reward-noise`` writes ``docs/figures/reward_noise.png`` and ``.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["LEVELS", "ROLLOUT_SAMPLERS", "added_noise_scores", "main", "rollout_scores"]

LEVELS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
ROLLOUT_SAMPLERS = (("ode", None), ("cps", 0.8), ("flow_sde", 0.7), ("dance_sde", 0.3))
REWARDS = ("digit", "digit_clean_trained")


def _rewards() -> dict:
    from fastcps.rewards import build_reward

    return {name: build_reward(name) for name in REWARDS}


@torch.no_grad()
def added_noise_scores(levels=LEVELS, seed: int = 0) -> list[dict]:
    """Mean reward of the held-out digits with N(0, level²) pixel noise added in [-1, 1]."""
    from fastcps.toy.digits import load_split, prompt_for

    x, y = load_split("heldout")
    prompts = [prompt_for(int(d)) for d in y]
    meta = [{"digit": int(d)} for d in y]
    rewards = _rewards()
    rows = []
    for level in levels:
        g = torch.Generator().manual_seed(seed)
        noisy = x + level * torch.randn(x.shape, generator=g)
        images = ((noisy + 1.0) * 0.5).clamp(0.0, 1.0).repeat(1, 3, 1, 1)
        row = {"level": level}
        for name, fn in rewards.items():
            r = fn(images, prompts, meta)
            row[name] = float(r.mean())
            row[f"{name}_sem"] = float(r.std() / len(r) ** 0.5)
        rows.append(row)
    return rows


@torch.no_grad()
def rollout_scores(
    num_steps: int = 8, noises_per_digit: int = 24, seed: int = 0, samplers=ROLLOUT_SAMPLERS
) -> list[dict]:
    """Each sampler's own samples of the shipped (untrained) base policy, scored by both rewards."""
    from fastcps.analysis.residual_noise import _label, high_freq_energy, sample_with
    from fastcps.policies.toy import ToyDigitsPolicy
    from fastcps.toy.digits import prompt_for

    policy = ToyDigitsPolicy()
    policy.transformer.eval()
    prompts = [prompt_for(d, k) for d in range(10) for k in range(noises_per_digit)]
    meta = [{"digit": d} for d in range(10) for _ in range(noises_per_digit)]
    cond = policy.encode(prompts)
    sigmas = policy.sigmas(num_steps)
    x1 = policy.initial_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1000 + num_steps)
    eps = [torch.randn(x1.shape, generator=gen) for _ in range(num_steps)]
    rewards = _rewards()
    rows, hf_ode, ode = [], None, {}
    for name, eta in samplers:
        images = policy.decode(sample_with(policy, cond, x1, sigmas, name, eta, eps))
        hf = float(high_freq_energy(images).mean())
        hf_ode = hf if name == "ode" else hf_ode
        row = {
            "sampler": name,
            "eta": eta,
            "label": _label(name, eta),
            "steps": num_steps,
            "images": len(prompts),
            "hf_ratio": hf / hf_ode,
        }
        for rname, fn in rewards.items():
            r = fn(images, prompts, meta)
            ode = {**ode, rname: r} if name == "ode" else ode
            row[rname] = float(r.mean())
            row[f"{rname}_sem"] = float(r.std() / len(r) ** 0.5)
            d = r - ode[rname]  # paired: the same x1 (and ε) as the ODE sample
            row[f"{rname}_vs_ode"] = float(d.mean())
            row[f"{rname}_vs_ode_sem"] = float(d.std() / len(d) ** 0.5)
        rows.append(row)
    return rows


def format_tables(noise: list[dict], rollouts: list[dict]) -> str:
    lines = ["| added noise std (in [-1, 1]) | digit | digit_clean_trained |", "|---|---|---|"]
    lines += [f"| {r['level']:g} | {r['digit']:.3f} | {r['digit_clean_trained']:.3f} |" for r in noise]
    lines += [
        "",
        "| base-policy rollouts (8 steps) | hf energy / ODE | digit | digit_clean_trained | "
        "digit − ODE's (paired) | digit_clean_trained − ODE's (paired) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['hf_ratio']:.2f} | {r['digit']:.3f} ± {r['digit_sem']:.3f} | "
        f"{r['digit_clean_trained']:.3f} ± {r['digit_clean_trained_sem']:.3f} | "
        f"{r['digit_vs_ode']:+.3f} ± {r['digit_vs_ode_sem']:.3f} | "
        f"{r['digit_clean_trained_vs_ode']:+.3f} ± {r['digit_clean_trained_vs_ode_sem']:.3f} |"
        for r in rollouts
    ]
    return "\n".join(lines)


def plot(noise: list[dict], rollouts: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lv = [r["level"] for r in noise]
    for name, style in zip(REWARDS, ("s--", "o-")):
        axes[0].plot(lv, [r[name] for r in noise], style, label=name)
    axes[0].set_xlabel("Gaussian noise std added to clean held-out digits (pixel space [-1, 1])")
    axes[0].set_ylabel("mean reward (p of the true digit)")
    axes[0].set_title("reward vs added noise, 360 held-out digits", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    labels = [r["label"] for r in rollouts]
    xs = range(len(rollouts))
    w = 0.38
    for k, (name, color) in enumerate(zip(REWARDS, ("tab:gray", "tab:blue"))):
        axes[1].bar(
            [x + (k - 0.5) * w for x in xs],
            [r[name] for r in rollouts],
            w,
            yerr=[r[f"{name}_sem"] for r in rollouts],
            color=color,
            label=name,
            capsize=3,
        )
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(
        [f"{lab}\nhf×{r['hf_ratio']:.2f}" for lab, r in zip(labels, rollouts)], fontsize=8
    )
    axes[1].set_ylabel("mean reward (± s.e.m.)")
    axes[1].set_title(
        f"untrained base policy's own samples ({rollouts[0]['steps']} steps, "
        f"{rollouts[0].get('images', 240)} images each)",
        fontsize=10,
    )
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: str | Path = "docs/figures", noises_per_digit: int = 24) -> dict:
    noise = added_noise_scores()
    rollouts = rollout_scores(noises_per_digit=noises_per_digit)
    print(format_tables(noise, rollouts))
    path = Path(out_dir) / "reward_noise.png"
    plot(noise, rollouts, path)
    print(f"wrote {path}")
    return {"added_noise": noise, "rollouts": rollouts}
