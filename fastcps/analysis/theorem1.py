"""Theorem 1: Flow-SDE's step is the first-order expansion of CPWS's, so the two converge as the
number of steps N grows.

Both share a0 = 1 − σ' and the injected std s (Flow-GRPO's Wiener-scaled std); only a1 differs:
Flow-SDE ``σ' − s²/(2σ)`` vs CPWS ``sqrt(σ'² − s²)``. We measure, for growing N:

- the per-step coefficient gap ``|a1_flow − a1_cpws|`` (max and sum over the steps where CPWS is
  defined), and the gap of the total noise level ``sqrt(a1² + s²)``;
- the final-sample gap: both samplers run on the toy digits policy from the same x1 and the same ε of
  every step; RMS over elements of the final latents, mean over samples.

Two sets of steps are compared:

- ``all``: every step where CPWS is defined. CPWS is undefined where s > σ' (always at the last
  step, σ' = 0, and on the toy's shift-1 schedule the step or two before it).
- ``interior``: steps with σ ≤ 0.9 and σ' ≥ 0.1, a fixed σ window. Outside it the theorem's premise
  (s → 0, s ≪ σ') does not hold as N grows. Near σ = 1, Flow-GRPO's s² = η²·σ·Δ/(1 − σ) with
  1 − σ = k/N and Δ = 1/N is η²·σ/k: O(1) whatever N (the first step, with σ* = sigmas[1], has
  s = η exactly). Near σ' = 0 on a linear grid, s/σ' tends to a constant.

Outside the compared set both samplers take Flow-SDE's step with the same ε, so the final-sample gap
measures only the compared steps. The order p is the least-squares slope of ``log gap`` against
``log(1/N)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastcps.samplers import step_coeffs

__all__ = ["coeff_gap", "fit_order", "main", "sample_gap", "theorem1"]


def fit_order(ns, values) -> float:
    """p in value ≈ C·N^(−p): least-squares slope of log(value) against log(1/N)."""
    ns, values = np.asarray(ns, dtype=np.float64), np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values > 0)  # an N with no compared step has no gap
    x = -np.log(ns[ok])
    y = np.log(values[ok])
    return float(np.polyfit(x, y, 1)[0])


def _pair(sigma: float, sigma_next: float, eta: float, sigma_max: float):
    """(flow_sde coeffs, cpws coeffs or None where undefined)."""
    flow = step_coeffs("flow_sde", sigma, sigma_next, eta, sigma_max=sigma_max)
    try:
        cpws = step_coeffs("cpws", sigma, sigma_next, eta, sigma_max=sigma_max)
    except ValueError:
        cpws = None
    return flow, cpws


def _compared(sig: list[float], i: int, cpws_defined: bool, which: str) -> bool:
    if not cpws_defined:
        return False
    return which == "all" or (sig[i] <= 0.9 and sig[i + 1] >= 0.1)


def coeff_gap(sigmas: torch.Tensor, eta: float, which: str = "all") -> dict:
    """Per-step gaps over the compared steps (``which``: "all" defined steps or "interior")."""
    gaps, tot_gaps, undefined = [], [], 0
    sig = sigmas.double().tolist()
    for i in range(len(sig) - 1):
        flow, cpws = _pair(sig[i], sig[i + 1], eta, sig[1])
        undefined += cpws is None
        if not _compared(sig, i, cpws is not None, which):
            continue
        gaps.append(abs(float(flow.a1[0]) - float(cpws.a1[0])))
        tf = math.hypot(float(flow.a1[0]), float(flow.s[0]))
        tc = math.hypot(float(cpws.a1[0]), float(cpws.s[0]))
        tot_gaps.append(abs(tf - tc))
    nan = float("nan")
    return {
        "max_a1_gap": max(gaps, default=nan),
        "sum_a1_gap": sum(gaps) if gaps else nan,
        "max_noise_gap": max(tot_gaps, default=nan),
        "undefined_steps": undefined,
    }


@torch.no_grad()
def sample_gap(
    policy, sigmas: torch.Tensor, eta: float, prompts: list[str], seed: int = 0, which: str = "all"
) -> float:
    """RMS gap of the final latents of Flow-SDE and CPWS with shared x1 and shared ε per step; outside
    the compared steps both take Flow-SDE's step."""
    b = len(prompts)
    cond = policy.encode(prompts)
    x1 = policy.initial_noise(b, generator=torch.Generator().manual_seed(seed))
    n = len(sigmas) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    eps = [torch.randn(x1.shape, generator=gen) for _ in range(n)]
    finals = []
    for name in ("flow_sde", "cpws"):
        x = x1.clone()
        for i in range(n):
            s_i, s_n = float(sigmas[i]), float(sigmas[i + 1])
            flow, cpws = _pair(s_i, s_n, eta, float(sigmas[1]))
            sig_list = sigmas.double().tolist()
            use_cpws = name == "cpws" and _compared(sig_list, i, cpws is not None, which)
            c = cpws if use_cpws else flow
            v = policy.velocity(policy.transformer, x, sigmas[i].float().expand(b), cond).float()
            x = float(c.alpha[0]) * x + float(c.beta[0]) * v + float(c.s[0]) * eps[i]
        finals.append(x)
    d = finals[0] - finals[1]
    return float(d.pow(2).flatten(1).mean(1).sqrt().mean())


def theorem1(
    steps=(8, 16, 32, 64, 128), eta: float = 0.7, samples: int = 20, policy=None, seed: int = 0
) -> dict:
    from fastcps.policies.toy import ToyDigitsPolicy
    from fastcps.toy.digits import prompt_for

    policy = policy or ToyDigitsPolicy()
    policy.transformer.eval()
    prompts = [prompt_for(i % 10, i // 10) for i in range(samples)]
    rows = []
    for n in steps:
        sig = policy.sigmas(n).double()
        for which in ("all", "interior"):
            rows.append(
                {
                    "N": n,
                    "steps": which,
                    **coeff_gap(sig, eta, which),
                    "sample_rms_gap": sample_gap(policy, sig, eta, prompts, seed, which),
                }
            )
    orders = {}
    for which in ("all", "interior"):
        sel = [r for r in rows if r["steps"] == which]
        orders[which] = {
            k: fit_order([r["N"] for r in sel], [r[k] for r in sel])
            for k in ("max_a1_gap", "sum_a1_gap", "max_noise_gap", "sample_rms_gap")
        }
    return {"eta": eta, "samples": samples, "rows": rows, "orders": orders}


def plot(res: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for which, style in (("all", "--"), ("interior", "-")):
        sel = [r for r in res["rows"] if r["steps"] == which]
        ns = [r["N"] for r in sel]
        for key, label, color in (
            ("max_a1_gap", "max per-step |a1 gap|", "tab:red"),
            ("sum_a1_gap", "sum of |a1 gaps|", "tab:orange"),
            ("sample_rms_gap", "final sample RMS gap", "tab:blue"),
        ):
            ax.loglog(
                ns,
                [r[key] for r in sel],
                style,
                marker="o",
                color=color,
                ms=4,
                label=f"{which}: {label}, order {res['orders'][which][key]:.2f}",
            )
    ax.set_xlabel("number of steps N")
    ax.set_ylabel("Flow-SDE vs CPWS")
    ax.set_title(f"Theorem 1 on the toy schedule (shift 1), η = {res['eta']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(res: dict) -> str:
    lines = [
        (
            "| steps compared | N | max per-step a1 gap | sum of a1 gaps | max noise-level gap | "
            "final sample RMS gap | CPWS-undefined steps |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for which in ("all", "interior"):
        for r in (r for r in res["rows"] if r["steps"] == which):
            lines.append(
                f"| {which} | {r['N']} | {r['max_a1_gap']:.3e} | {r['sum_a1_gap']:.3e} | "
                f"{r['max_noise_gap']:.3e} | {r['sample_rms_gap']:.3e} | {r['undefined_steps']} |"
            )
        o = res["orders"][which]
        lines.append(
            f"| {which} | fitted order p (gap ∝ N^-p) | {o['max_a1_gap']:.2f} | {o['sum_a1_gap']:.2f} | "
            f"{o['max_noise_gap']:.2f} | {o['sample_rms_gap']:.2f} | |"
        )
    return "\n".join(lines)


def main(out_dir: str | Path = "docs/figures", steps=(8, 16, 32, 64, 128), samples: int = 20) -> dict:
    torch.set_num_threads(1)
    res = theorem1(steps, samples=samples)
    print(
        f"Theorem 1: Flow-SDE vs CPWS, η {res['eta']}, toy schedule (shift 1), {samples} samples, "
        "shared x1 and ε; outside the compared steps both take Flow-SDE's step.\n"
        "all = every CPWS-defined step; interior = σ ≤ 0.9 and σ' ≥ 0.1"
    )
    print(format_table(res))
    path = Path(out_dir) / "theorem1.png"
    plot(res, path)
    print(f"\nwrote {path}")
    return res
