"""``sde_step_with_logprob``: the drop-in for flow_grpo / DanceGRPO users, one function for rollout
and training, every sampler of the paper behind one fused op."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastcps.ops.cps_logprob_kl import cps_logprob_kl
from fastcps.ops.cps_step import cps_step
from fastcps.samplers import step_coeffs


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x' (the given one when prev_sample was passed)
    log_prob: torch.Tensor  # (B,) fp32, the sampler's own definition unless logprob= says otherwise
    mean: torch.Tensor  # μ = α·x + β·v, differentiable w.r.t. model_output when it requires grad
    std: torch.Tensor  # (B,) fp32 injected std s of docs/math.md


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    *,
    sampler: str = "cps",
    eta=None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sigma_max=None,
    logprob: str | None = None,
) -> StepOutput:
    """One step from σ to σ' (floats or (B,) tensors) with the log-prob of x'.

    - ``prev_sample`` given: nothing is drawn; ``log_prob`` is that of the given x' (training).
    - ``noise`` given: it is ε. Otherwise ε comes from ``generator`` (torch.randn) or ``seed``
      (in-kernel Philox; give each step its own seed).
    - ``log_prob``: ``cps``/``cpws``/``ode`` use the paper's ``−mean((x' − μ)²)``; ``flow_sde``,
      ``dance_sde`` and ``dpmpp1_sde`` the full Gaussian (Flow-GRPO eq. 14, Dance-GRPO's
      ``flux_step``); ``logprob="paper"|"gaussian"`` overrides. ``sigma_max`` is the schedule's
      second sigma, needed by ``flow_sde``/``cpws`` at σ = 1.
    - Gradients flow to ``model_output`` through the fused backward.
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"argument 'sample' must be a torch.Tensor, got {type(sample).__name__}")
    drawn = [n for n, a in (("noise", noise), ("generator", generator), ("seed", seed)) if a is not None]
    if prev_sample is not None and drawn:
        raise ValueError(f"prev_sample is given, so no noise is drawn: drop {', '.join(drawn)}")
    if len(drawn) > 1:
        raise ValueError(f"give at most one source of noise, got {' and '.join(drawn)}")
    coeffs = step_coeffs(
        sampler,
        sigma,
        sigma_next,
        eta,
        batch_size=sample.shape[0] if sample.ndim else None,
        sigma_max=sigma_max,
        logprob=logprob,
        device=sample.device,
    )
    needs_grad = (
        torch.is_grad_enabled() and isinstance(model_output, torch.Tensor) and model_output.requires_grad
    )

    if prev_sample is None:
        if noise is None and seed is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        with torch.no_grad():
            prev, logp, mean = cps_step(
                sample, model_output.detach(), coeffs, noise=noise, seed=seed, return_mean=True
            )
    elif needs_grad:
        prev, logp, mean = prev_sample, None, None
    else:
        prev, logp, mean = cps_step(sample, model_output, coeffs, prev_sample=prev_sample, return_mean=True)

    if needs_grad:
        logp = cps_logprob_kl(sample, model_output, prev, coeffs).log_prob
        b = sample.shape[0]
        shape = (b,) + (1,) * (sample.ndim - 1)
        mean = coeffs.alpha.view(shape) * sample.float() + coeffs.beta.view(shape) * model_output.float()
        mean = mean.to(sample.dtype)
    return StepOutput(prev, logp, mean, coeffs.s)
