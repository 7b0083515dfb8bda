"""Every sampler of the paper as three per-sample scalars (docs/math.md, "One shape for every sampler").

A step is ``x' = a0·x̂0 + a1·x̂1 + s·ε = α·x + β·v + s·ε`` and its log-probability is
``lp_c − lp_w·mean((x' − μ)²)``; the KL to a reference policy is ``kl_w·β²·mean((v − v_ref)²)``.
A sampler is therefore one small function ``(σ, σ', η) -> StepCoeffs``; one fused kernel serves all.

σ, σ' and η may be Python floats or per-sample tensors; the result is always per-sample fp32 of
shape (B,) once broadcast against ``batch_size``.

Validation never stalls a GPU nor breaks a torch.compile graph: inputs readable on the host (Python
numbers, CPU tensors, outside tracing) are checked there and raise ``ValueError``; CUDA tensors and
traced graphs get device-side asserts (``torch._assert_async``) with the same messages, and Python
numbers are still checked as numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "StepCoeffs",
    "Sampler",
    "SAMPLERS",
    "get_sampler",
    "step_coeffs",
    "LOGPROB_FORMS",
    "KL_FORMS",
]

LOGPROB_FORMS = ("paper", "gaussian")
# KL to the reference, kl_w·mean((μθ − μref)²): "paper" = CPS eq. 16 / FlowCPS's code (kl_w = 1);
# "gaussian" = the KL of the two step Gaussians, Flow-GRPO's paper eq. 6 (1/(2s²)); "flow_grpo" =
# Flow-GRPO's training code (scripts/train_sd3.py), 1/(2·std_dev_t²) with std_dev_t = s/√Δ, i.e. Δ/(2s²).
KL_FORMS = ("paper", "gaussian", "flow_grpo")
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
    kl: str  # the KL form of its anchor's training code: "paper", "gaussian" or "flow_grpo"
    uses_eta: bool = True


def _f32(value, like: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """``value`` as fp32 on ``device`` (default: ``like``'s). Python numbers go through ``torch.full``,
    a fill kernel, not a host-to-device copy."""
    device = like.device if device is None and like is not None else device
    if isinstance(value, torch.Tensor):
        # non_blocking only from the host: a device-to-host copy must land before it is read
        return value.detach().to(device=device, dtype=torch.float32, non_blocking=value.device.type == "cpu")
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _readable_on_host(*values) -> bool:
    """True when every tensor among ``values`` can be read without a device sync or a graph break:
    real CPU tensors, outside torch.compile tracing and fake-tensor mode."""
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return False
    return all(not isinstance(v, torch.Tensor) or (v.device.type == "cpu" and not is_fake(v)) for v in values)


def _require(bad, message: str, detail: Callable[[], str] | None = None) -> None:
    """Stop where ``bad`` holds: a Python bool (numbers) or a host-readable tensor raises
    ``ValueError(message + detail())`` now; a device tensor or a traced one becomes a device-side assert
    with ``message`` (no host sync; the run stops with it when the assert runs)."""
    if isinstance(bad, torch.Tensor):
        if not _readable_on_host(bad):
            torch._assert_async(torch.logical_not(bad.any()), message)
            return
        bad = bool(bad.any())
    if bad:
        raise ValueError(message + (detail() if detail is not None else ""))


def _show(value) -> str:
    return str(value.tolist() if isinstance(value, torch.Tensor) else value)


# Each rule returns (s, a1); a0 = 1 − σ' for every sampler in scope.


def _ode(sigma, sigma_next, eta, sigma_max):
    return torch.zeros_like(sigma_next), sigma_next


def _flow_sde_std(sigma, sigma_next, eta, sigma_max):
    # Flow-GRPO eq. 3: s = η·sqrt(σ / (1 − σ*))·sqrt(Δ), with σ* = sigmas[1] at σ = 1 so the first
    # step (σ = 1) does not divide by zero. Flow-GRPO reads sigmas[1] off its scheduler.
    at_one = sigma == 1.0
    if sigma_max is None:
        _require(
            at_one,
            "flow_sde at sigma = 1 needs sigma_max: Flow-GRPO replaces sigma by the schedule's "
            "second sigma (sigmas[1]) there. Pass sigma_max=sigmas[1].",
        )
        sigma_star = sigma  # σ < 1 everywhere, as just required
    else:
        sigma_max = _f32(sigma_max, sigma)
        _require(
            at_one & (sigma_max >= 1.0),
            "sigma_max must be < 1 (the schedule's second sigma)",
            lambda: f", got {sigma_max}",
        )
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

    def where_too_big() -> str:
        bad = int(torch.nonzero(s > sigma_next)[0, 0])
        return (
            f" (sample {bad} has s = {float(s.flatten()[bad]):.4g} > "
            f"sigma_next = {float(sigma_next.flatten()[bad]):.4g})"
        )

    _require(
        s > sigma_next,
        "cpws needs its Wiener std s <= sigma_next (eq. 17). Lower eta, or use cps "
        "(whose std is sigma_next·sin(eta·pi/2)) for that step",
        where_too_big,
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
        # FlowCPS's scripts/train_*.py: mean((μ − μ_ref)²), unnormalised.
        Sampler("cps", 0.8, _cps, "paper", "paper"),
        # Flow-GRPO's scripts/train_sd3.py: mean((μ − μ_ref)²) / (2·std_dev_t²), std_dev_t without √Δ.
        Sampler("flow_sde", 0.7, _flow_sde, "gaussian", "flow_grpo"),
        # DanceGRPO's code has no KL: the Gaussian form, the true KL of its step.
        Sampler("dance_sde", 0.3, _dance_sde, "gaussian", "gaussian"),
        Sampler("ode", 0.0, _ode, "paper", "paper", uses_eta=False),
        Sampler("cpws", 0.7, _cpws, "paper", "paper"),  # the CPS paper's sampler family: its KL form
        Sampler("dpmpp1_sde", 0.0, _dpmpp1_sde, "gaussian", "gaussian", uses_eta=False),
    )
}


def _kl_weight(form: str, s: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``kl_w`` of ``KL = kl_w·mean((μθ − μref)²)``: 1 ("paper"), 1/(2s²) ("gaussian"), or Δ/(2s²)
    ("flow_grpo": Flow-GRPO's training code divides by 2·std_dev_t² where std_dev_t = s/√Δ).
    Undefined (NaN) where a divisor form meets s = 0: such steps are never trained."""
    if form == "paper":
        return torch.ones_like(s)
    num = 0.5 * delta if form == "flow_grpo" else torch.full_like(s, 0.5)
    return torch.where(s > 0, num / (s * s), torch.full_like(s, float("nan")))


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
    kl: str | None = None,
    device: torch.device | str | None = None,
) -> StepCoeffs:
    """Per-sample coefficients of one step from σ to σ' (floats or (B,) tensors).

    ``eta=None`` takes the sampler's default; ``logprob`` picks "paper" (−mean((x'−μ)²)) or
    "gaussian" (the full Gaussian density, mean over elements) and defaults to the sampler's own.
    Under "gaussian" a step with s = 0 has no density: its lp_w and lp_c are NaN, never trained.
    ``kl`` picks the KL weight ``kl_w`` of ``kl_w·mean((μθ − μref)²)`` (KL_FORMS) and defaults to the
    form of the sampler's anchor's training code.
    """
    spec = get_sampler(sampler)
    form = spec.logprob if logprob is None else logprob
    if form not in LOGPROB_FORMS:
        raise ValueError(f"logprob must be one of {LOGPROB_FORMS}, got {logprob!r}")
    kl_form = spec.kl if kl is None else kl
    if kl_form not in KL_FORMS:
        raise ValueError(f"kl must be one of {KL_FORMS}, got {kl!r}")
    eta = spec.default_eta if eta is None else eta

    ref = next((t for t in (sigma, sigma_next, eta) if isinstance(t, torch.Tensor)), None)
    device = torch.device(device if device is not None else ref.device if ref is not None else "cpu")
    # Computed on the host when every input is readable there (one copy of the result to `device`
    # at the end), else on `device` with device-side asserts.
    on_host = _readable_on_host(sigma, sigma_next, eta, sigma_max)
    where = torch.device("cpu") if on_host else device
    sig, nxt, et = (_f32(t, device=where).reshape(-1) for t in (sigma, sigma_next, eta))
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

    # Off the host, Python numbers are still checked as numbers (a ValueError now, not an assert later).
    c_sig, c_nxt, c_et = (
        t if on_host or isinstance(raw, torch.Tensor) else raw
        for raw, t in zip((sigma, sigma_next, eta), (sig, nxt, et))
    )
    _require((c_sig <= 0) | (c_sig > 1), "sigma must lie in (0, 1]", lambda: f", got {_show(c_sig)}")
    _require(
        (c_nxt < 0) | (c_nxt >= c_sig),
        "sigma_next must satisfy 0 <= sigma_next < sigma",
        lambda: f", got sigma={_show(c_sig)}, sigma_next={_show(c_nxt)}",
    )
    if spec.uses_eta:
        _require(c_et < 0, f"eta must be >= 0 for {sampler}", lambda: f", got {_show(c_et)}")

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
    kl_w = _kl_weight(kl_form, s, sig - nxt)
    coeffs = StepCoeffs(a0, a1, s, alpha, beta, lp_w, lp_c, kl_w)
    if where != device:
        coeffs = StepCoeffs(*torch.stack(coeffs).to(device, non_blocking=True).unbind(0))
    return coeffs
