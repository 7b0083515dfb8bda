"""Fused Triton kernels of fastcps (installed as fastcps.kernels). No model, no config.

Launchers take validated (B, N) latents (unit last-dim stride, any row stride; fp32/bf16/fp16 each)
and (B,) fp32 coefficient tensors; see each module's docstring for the math and launch shape.
"""

from .cps_logprob_kl import cps_logprob_kl_bwd, cps_logprob_kl_fwd
from .cps_step import cps_step_fwd

__all__ = ["cps_logprob_kl_bwd", "cps_logprob_kl_fwd", "cps_step_fwd"]
