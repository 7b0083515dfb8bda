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
