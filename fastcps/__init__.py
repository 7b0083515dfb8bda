"""fastcps: GRPO with Coefficients-Preserving Sampling for flow-matching models."""

from fastcps.ops.cps_logprob_kl import LogprobKL, cps_logprob_kl, cps_logprob_kl_ref
from fastcps.ops.cps_step import StepResult, cps_step, cps_step_ref
from fastcps.samplers import SAMPLERS, StepCoeffs, get_sampler, step_coeffs
from fastcps.step import StepOutput, sde_step_with_logprob

__all__ = [
    "SAMPLERS",
    "StepCoeffs",
    "get_sampler",
    "step_coeffs",
    "cps_step",
    "cps_step_ref",
    "StepResult",
    "cps_logprob_kl",
    "cps_logprob_kl_ref",
    "LogprobKL",
    "sde_step_with_logprob",
    "StepOutput",
]
__version__ = "0.1.0"
