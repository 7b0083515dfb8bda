"""The paper's Figure 2 in numbers: the total noise level ``sqrt(a1² + s²)`` left in x' by each step,
against the scheduler's σ' (what the next model call is told the noise level is).

A coefficients-preserving sampler (CPS, CPWS) matches σ' exactly; Flow-SDE and Dance-SDE exceed it
(docs/math.md; paper eq. 11), most at the last step where σ' = 0 and the excess is the residual noise in the
image.
CPWS is undefined where its Wiener std exceeds σ' (always at the last step): those cells are "undef".
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastcps.samplers import step_coeffs
from fastcps.schedule import flow_sigmas

__all__ = [
    "FLUX_MU_512",
    "SAMPLERS_FIG2",
    "SCHEDULES",
    "flux_mu",
    "format_table",
    "main",
    "noise_level_table",
    "plot",
    "schedule_sigmas",
    "total_noise",
]


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' ``calculate_shift`` (FluxPipeline): mu linear in the packed token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


# FLUX.1-dev at 512²: (512/16)² = 1024 packed tokens -> mu = 0.63.
FLUX_MU_512 = flux_mu(1024)
SCHEDULES = {"flux": {"mu": FLUX_MU_512}, "sd3": {"shift": 3.0}}
# (label, sampler, eta): the paper's Figure 2 line-up at each sampler's default η.
SAMPLERS_FIG2 = (
    ("Flow-SDE (η 0.7)", "flow_sde", 0.7),
    ("Dance-SDE (η 0.3)", "dance_sde", 0.3),
    ("CPS (η 0.8)", "cps", 0.8),
    ("CPWS (η 0.7)", "cpws", 0.7),
)


def schedule_sigmas(schedule: str, num_steps: int) -> torch.Tensor:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    return flow_sigmas(num_steps, **SCHEDULES[schedule]).double()


def total_noise(sampler: str, sigma: float, sigma_next: float, eta: float, sigma_max: float) -> float:
    """``sqrt(a1² + s²)`` of one step, or NaN where the sampler is undefined (CPWS with s > σ')."""
    try:
        c = step_coeffs(sampler, sigma, sigma_next, eta, sigma_max=sigma_max)
    except ValueError:
        if sampler == "cpws":
            return float("nan")
        raise
    return math.sqrt(float(c.a1[0]) ** 2 + float(c.s[0]) ** 2)


def noise_level_table(schedule: str, num_steps: int, samplers=SAMPLERS_FIG2) -> dict:
    """{"sigmas": [N+1], "sigma_next": [N], label: [N] total noise per step (NaN = undefined)}."""
    sig = schedule_sigmas(schedule, num_steps)
    out = {
        "schedule": schedule,
        "num_steps": num_steps,
        "sigmas": sig.tolist(),
        "sigma_next": sig[1:].tolist(),
    }
    for label, name, eta in samplers:
        out[label] = [
            total_noise(name, float(sig[i]), float(sig[i + 1]), eta, float(sig[1])) for i in range(num_steps)
        ]
    return out


def format_table(t: dict) -> str:
    labels = [k for k in t if k not in ("schedule", "num_steps", "sigmas", "sigma_next")]
    head = ["step", "σ", "σ' (scheduler)"] + labels
    rows = []
    for i in range(t["num_steps"]):
        cells = [str(i + 1), f"{t['sigmas'][i]:.3f}", f"{t['sigma_next'][i]:.3f}"]
        cells += ["undef" if math.isnan(t[k][i]) else f"{t[k][i]:.3f}" for k in labels]
        rows.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def plot(tables: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.8), squeeze=False)
    styles = {
        "Flow-SDE": ("tab:red", "o"),
        "Dance-SDE": ("tab:orange", "s"),
        "CPS": ("tab:blue", "^"),
        "CPWS": ("tab:green", "v"),
    }
    for ax, t in zip(axes[0], tables):
        x = list(range(1, t["num_steps"] + 1))
        ax.plot(x, t["sigma_next"], "k--", lw=2, label="scheduler σ'")
        for k in t:
            if k in ("schedule", "num_steps", "sigmas", "sigma_next"):
                continue
            color, marker = styles[k.split(" ")[0]]
            ax.plot(x, t[k], color=color, marker=marker, ms=4, lw=1.2, label=k, alpha=0.85)
        ax.set_title(f"{t['schedule'].upper()} schedule, {t['num_steps']} steps", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("total noise level sqrt(a1² + s²)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        "Noise level after each step vs the scheduler's σ' (CPWS undefined where s > σ': gap)", fontsize=10
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out_dir: str | Path = "docs/figures", steps=(10, 4), schedules=("flux", "sd3")) -> list[dict]:
    tables = [noise_level_table(s, n) for s in schedules for n in steps]
    print(
        f"FLUX mu = {FLUX_MU_512:.4f} (512², 1024 tokens); SD3 static shift 3. "
        "'undef': CPWS's Wiener std exceeds σ' there (eq. 17 needs s ≤ σ')."
    )
    for t in tables:
        print(f"\n{t['schedule'].upper()}, {t['num_steps']} steps")
        print(format_table(t))
    path = Path(out_dir) / "noise_levels.png"
    plot(tables, path)
    print(f"\nwrote {path}")
    return tables
