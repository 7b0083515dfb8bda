"""Sigma schedules, computed by diffusers' FlowMatchEulerDiscreteScheduler as the pipelines do."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def flow_sigmas(num_steps: int, *, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """(num_steps + 1,) fp32 sigmas from 1 toward 0 with the trailing 0 (docs/math.md, Notation).

    Like FluxPipeline, the base grid is ``linspace(1, 1/N, N)``; ``mu`` applies FLUX's dynamic
    (exponential) shift as the pipeline computes it, else ``shift`` is SD3's static shift.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dynamic = mu is not None
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0 if dynamic else shift, use_dynamic_shifting=dynamic)
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    sched.set_timesteps(sigmas=base, mu=mu) if dynamic else sched.set_timesteps(sigmas=base)
    return sched.sigmas.to(torch.float32)


def pipeline_sigmas(
    scheduler_config: dict, num_tokens: int, num_steps: int, *, default_shift: float = 1.0
) -> torch.Tensor:
    """The schedule a pipeline's scheduler gives for ``num_tokens`` image tokens, as FluxPipeline and
    QwenImagePipeline compute it: the scheduler built from its WHOLE config (Qwen-Image's ``shift_terminal``
    and exponential time shift included), ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)`` with the
    resolution-dependent ``mu = calculate_shift(num_tokens, ...)`` when ``use_dynamic_shifting`` (FLUX.1-dev,
    Qwen-Image), else the static ``shift`` (FLUX.1-schnell 1, SD3.5 3; ``default_shift`` when the config has
    none), and the trailing 0. SD3's pipeline passes no sigmas (its grid ends at σ ≈ 0.009: see
    ``fastcps.policies.sd3``); the grid here is the FLUX one for every family (docs/math.md, Notation).
    The policies and ``fastcps.plan`` (which loads no model) share it."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    c = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    c.setdefault("shift", default_shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(c)
    mu = None
    if sched.config.use_dynamic_shifting:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            num_tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    sigmas = sched.sigmas.to(torch.float32)
    if not bool(torch.isfinite(sigmas).all()):  # shift_terminal stretches by 1 / (1 - sigma_last): 1 step
        raise ValueError(
            f"the scheduler config gives non-finite sigmas at {num_steps} step(s) ({sigmas.tolist()}): "
            "raise sampler.num_steps / eval.num_steps"
        )
    return sigmas
