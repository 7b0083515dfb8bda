"""fastcps: GRPO with Coefficients-Preserving Sampling for flow-matching models."""

from fastcps.samplers import SAMPLERS, StepCoeffs, get_sampler, step_coeffs

__all__ = ["SAMPLERS", "StepCoeffs", "get_sampler", "step_coeffs"]
__version__ = "0.1.0"
