"""Rollout: sample trajectories with any registered sampler and keep what the update needs.

Which steps are stochastic and which are trained is decided once per epoch (``plan_steps``): every
step, or a MixGRPO-style window with the ODE outside it; of the stochastic steps that inject noise
(s > 0: CPS's last step does not), the first ``timestep_fraction`` are trained and stored in fp32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from fastcps.ops.cps_step import cps_step
from fastcps.samplers import StepCoeffs, step_coeffs


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (run seed, epoch, step, ...), stable across runs and machines."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


class StepPlan(NamedTuple):
    stochastic: list[bool]  # per step: the sampler's step (True) or the ODE step (False)
    trained: list[int]  # step indices stored and trained, in order


def plan_steps(sampler: str, eta, sigmas: torch.Tensor, *, timestep_fraction: float = 1.0,
               window_size: int | None = None, window_start: int = 0, logprob=None) -> StepPlan:
    n = len(sigmas) - 1
    if window_size is None:
        stochastic = [True] * n
    else:
        if not 0 <= window_start <= n - window_size:
            raise ValueError(f"sde window [{window_start}, {window_start + window_size}) does not fit {n} steps")
        stochastic = [window_start <= i < window_start + window_size for i in range(n)]
    noisy = []
    for i in range(n):
        if stochastic[i]:
            c = step_coeffs(sampler, sigmas[i], sigmas[i + 1], eta, sigma_max=sigmas[1], logprob=logprob)
            if float(c.s[0]) > 0:  # a step without noise has no policy gradient: never trained
                noisy.append(i)
    k = max(1, math.ceil(timestep_fraction * len(noisy))) if noisy else 0
    return StepPlan(stochastic, noisy[:k])


def coeffs_for_step(plan: StepPlan, i: int, sampler: str, eta, sigmas: torch.Tensor, batch: int,
                    logprob=None) -> StepCoeffs:
    name = sampler if plan.stochastic[i] else "ode"
    return step_coeffs(name, sigmas[i], sigmas[i + 1], eta, batch_size=batch, sigma_max=sigmas[1],
                       logprob=logprob, device=sigmas.device)


class Trajectory(NamedTuple):
    final: torch.Tensor  # (B, *latent) fp32 x at σ = 0
    x_t: torch.Tensor  # (B, J, *latent) fp32 latents before each trained step
    x_next: torch.Tensor  # (B, J, *latent) fp32 latents after it
    log_prob: torch.Tensor  # (B, J) fp32 rollout log-probs


@torch.no_grad()
def sample(policy, model, cond, x: torch.Tensor, sigmas: torch.Tensor, plan: StepPlan, *, sampler: str,
           eta=None, logprob=None, step_seeds: list[int] | None = None, first_index: int = 0) -> Trajectory:
    """Run all steps from x = x1. Noise of step i, sample b comes from Philox with
    seed ``step_seeds[i]`` and counter ``(first_index + b)·N + n``: the same images whatever the
    batch split or the number of processes."""
    b = x.shape[0]
    numel = x[0].numel()
    trained = set(plan.trained)
    xs, nexts, lps = [], [], []
    x = x.float()
    for i in range(len(sigmas) - 1):
        v = policy.velocity(model, x, sigmas[i].expand(b), cond)
        c = coeffs_for_step(plan, i, sampler, eta, sigmas, b, logprob)
        if step_seeds is None:
            out = cps_step(x, v.float(), c, noise=torch.randn_like(x))
        else:
            out = cps_step(x, v.float(), c, seed=step_seeds[i], offset=first_index * numel)
        if i in trained:
            xs.append(x)
            nexts.append(out.prev_sample)
            lps.append(out.log_prob)
        x = out.prev_sample
    empty = x.new_zeros((b, 0, *x.shape[1:]))
    return Trajectory(
        x,
        torch.stack(xs, 1) if xs else empty,
        torch.stack(nexts, 1) if nexts else empty,
        torch.stack(lps, 1) if lps else x.new_zeros((b, 0)),
    )
