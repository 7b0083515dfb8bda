"""Every sampler of the paper as three per-sample scalars (MATH.md, "One shape for every sampler").

A step is ``x' = a0·x̂0 + a1·x̂1 + s·ε = α·x + β·v + s·ε`` and its log-probability is
``lp_c − lp_w·mean((x' − μ)²)``; the KL to a reference policy is ``kl_w·β²·mean((v − v_ref)²)``.
A sampler is therefore one small function ``(σ, σ', η) -> StepCoeffs``; one fused kernel serves all.

σ, σ' and η may be Python floats or per-sample tensors; the result is always per-sample fp32 of
shape (B,) once broadcast against ``batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

__all__ = [
    "StepCoeffs",
    "Sampler",
    "SAMPLERS",
    "get_sampler",
    "step_coeffs",
    "LOGPROB_FORMS",
]

LOGPROB_FORMS = ("paper", "gaussian")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepCoeffs(NamedTuple):
    """Per-sample fp32 coefficients of one step; every field has shape (B,)."""

    a0: torch.Tensor  # weight of the predicted data x̂0 = x − σ·v
    a1: torch.Tensor  # weight of the predicted noise x̂1 = x + (1 − σ)·v
    s: torch.Tensor  # injected standard deviation (0 for a deterministic step)
    alpha: torch.Tensor  # a0 + a1: weight of x in the mean
    beta: torch.Tensor  # −σ·a0 + (1 − σ)·a1: weight of v in the mean
    lp_w: torch.Tensor  # log-prob = lp_c − lp_w·mean((x' − μ)²)
    lp_c: torch.Tensor
    kl_w: torch.Tensor  # KL = kl_w·β²·mean((v − v_ref)²)


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its noise rule and the log-prob form it is trained with by default."""

    name: str
    default_eta: float
    noise: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (σ, σ', η, σ_max) -> (s, a1)
    logprob: str  # "paper" (CPS eq. 15) or "gaussian" (Flow-GRPO eq. 14)
    uses_eta: bool = True


def _f32(value, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32)
    device = like.device if like is not None else None
    return torch.tensor(float(value), dtype=torch.float32, device=device)


# Each rule returns (s, a1); a0 = 1 − σ' for every sampler in scope.


def _ode(sigma, sigma_next, eta, sigma_max):
    return torch.zeros_like(sigma_next), sigma_next


def _flow_sde_std(sigma, sigma_next, eta, sigma_max):
    # Flow-GRPO eq. 3: s = η·sqrt(σ / (1 − σ*))·sqrt(Δ), with σ* = sigmas[1] at σ = 1 so the first
    # step (σ = 1) does not divide by zero. Flow-GRPO reads sigmas[1] off its scheduler.
    at_one = sigma == 1.0
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError(
                "flow_sde at sigma = 1 needs sigma_max: Flow-GRPO replaces sigma by the schedule's "
                "second sigma (sigmas[1]) there. Pass sigma_max=sigmas[1]."
            )
        sigma_max = _f32(sigma_max, sigma)
        if bool((sigma_max >= 1.0).any()):
            raise ValueError(f"sigma_max must be < 1 (the schedule's second sigma), got {sigma_max}")
    else:
        sigma_max = sigma  # unused where σ < 1
    sigma_star = torch.where(at_one, sigma_max.expand_as(sigma), sigma)
    return eta * torch.sqrt(sigma / (1.0 - sigma_star)) * torch.sqrt(sigma - sigma_next)


def _flow_sde(sigma, sigma_next, eta, sigma_max):
    s = _flow_sde_std(sigma, sigma_next, eta, sigma_max)
    return s, sigma_next - s * s / (2.0 * sigma)


def _dance_sde(sigma, sigma_next, eta, sigma_max):
    s = eta * torch.sqrt(sigma - sigma_next)
    return s, sigma_next - s * s / (2.0 * sigma)


def _cps(sigma, sigma_next, eta, sigma_max):
    # eq. 13: the total noise level sqrt(a1² + s²) stays exactly σ'.
    angle = eta * (math.pi / 2.0)
    return sigma_next * torch.sin(angle), sigma_next * torch.cos(angle)


def _cpws(sigma, sigma_next, eta, sigma_max):
    s = _flow_sde_std(sigma, sigma_next, eta, sigma_max)
    if bool((s > sigma_next).any()):
        bad = int(torch.nonzero(s > sigma_next)[0, 0])
        raise ValueError(
            f"cpws needs its Wiener std s <= sigma_next (eq. 17), but sample {bad} has "
            f"s = {float(s.flatten()[bad]):.4g} > sigma_next = {float(sigma_next.flatten()[bad]):.4g}. "
            "Lower eta, or use cps (whose std is sigma_next·sin(eta·pi/2)) for that step."
        )
    return s, torch.sqrt(sigma_next * sigma_next - s * s)


def _dpmpp1_sde(sigma, sigma_next, eta, sigma_max):
    # λ = log((1 − σ)/σ), h = λ' − λ, so e^(−h) = (1 − σ)·σ' / (σ·(1 − σ')): finite at σ = 1 and σ' = 0.
    e_minus_h = (1.0 - sigma) * sigma_next / (sigma * (1.0 - sigma_next))
    s = sigma_next * torch.sqrt(torch.clamp(1.0 - e_minus_h * e_minus_h, min=0.0))
    return s, sigma_next * e_minus_h


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("cps", 0.8, _cps, "paper"),
        Sampler("flow_sde", 0.7, _flow_sde, "gaussian"),
        Sampler("dance_sde", 0.3, _dance_sde, "gaussian"),
        Sampler("ode", 0.0, _ode, "paper", uses_eta=False),
        Sampler("cpws", 0.7, _cpws, "paper"),
        Sampler("dpmpp1_sde", 0.0, _dpmpp1_sde, "gaussian", uses_eta=False),
    )
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


def step_coeffs(
    sampler: str,
    sigma,
    sigma_next,
    eta=None,
    *,
    batch_size: int | None = None,
    sigma_max=None,
    logprob: str | None = None,
    device: torch.device | str | None = None,
) -> StepCoeffs:
    """Per-sample coefficients of one step from σ to σ' (floats or (B,) tensors).

    ``eta=None`` takes the sampler's default; ``logprob`` picks "paper" (−mean((x'−μ)²)) or
    "gaussian" (the full Gaussian density, mean over elements) and defaults to the sampler's own.
    Under "gaussian" a step with s = 0 has no density: its lp_w and lp_c are NaN, never trained.
    """
    spec = get_sampler(sampler)
    form = spec.logprob if logprob is None else logprob
    if form not in LOGPROB_FORMS:
        raise ValueError(f"logprob must be one of {LOGPROB_FORMS}, got {logprob!r}")
    eta = spec.default_eta if eta is None else eta

    ref = next((t for t in (sigma, sigma_next, eta) if isinstance(t, torch.Tensor)), None)
    if device is None:
        device = ref.device if ref is not None else "cpu"
    sig = _f32(sigma).to(device).reshape(-1)
    nxt = _f32(sigma_next).to(device).reshape(-1)
    et = _f32(eta).to(device).reshape(-1)
    sizes = {t.numel() for t in (sig, nxt, et)} - {1}
    if batch_size is not None:
        sizes.add(batch_size)
    if len(sizes) > 1:
        raise ValueError(
            f"sigma ({sig.numel()}), sigma_next ({nxt.numel()}), eta ({et.numel()}) and the batch "
            f"({batch_size}) disagree in size: give floats or (B,) tensors"
        )
    b = sizes.pop() if sizes else 1
    sig, nxt, et = (t.expand(b).contiguous() for t in (sig, nxt, et))

    if bool((sig <= 0).any()) or bool((sig > 1).any()):
        raise ValueError(f"sigma must lie in (0, 1], got {sig.tolist()}")
    if bool((nxt < 0).any()) or bool((nxt >= sig).any()):
        raise ValueError(f"sigma_next must satisfy 0 <= sigma_next < sigma, got sigma={sig.tolist()}, "
                         f"sigma_next={nxt.tolist()}")
    if spec.uses_eta and bool((et < 0).any()):
        raise ValueError(f"eta must be >= 0 for {sampler}, got {et.tolist()}")

    s, a1 = spec.noise(sig, nxt, et, sigma_max)
    a0 = 1.0 - nxt
    alpha = a0 + a1
    beta = -sig * a0 + (1.0 - sig) * a1
    if form == "paper":
        lp_w = torch.ones_like(s)
        lp_c = torch.zeros_like(s)
    else:
        var = s * s
        nan = torch.full_like(s, float("nan"))
        lp_w = torch.where(s > 0, 0.5 / var, nan)
        lp_c = torch.where(s > 0, -torch.log(s) - _LOG_SQRT_2PI, nan)
    kl_w = lp_w.clone()  # Flow-GRPO's KL carries the same 1/(2s²) as its log-prob; CPS's carries 1.
    return StepCoeffs(a0, a1, s, alpha, beta, lp_w, lp_c, kl_w)
