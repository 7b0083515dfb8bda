"""Analyses of the paper's claims on the samplers and on the toy (issue 5):

- ``noise_levels``: the total noise level ``sqrt(a1² + s²)`` of each step against the schedule's σ'
  (the paper's Figure 2), for the FLUX and SD3 schedules at 10 and 4 steps.
- ``theorem1``: Flow-SDE's step converges to CPWS's as the number of steps grows (per-step
  coefficient gap and final-sample gap, with a fitted order in 1/N).
- ``residual_noise``: noise left in the final toy samples by each sampler, at 4, 6 and 10 steps.
- ``reward_noise``: the ``digit`` and ``digit_clean_trained`` rewards against added pixel noise and on
  each sampler's samples of the base policy (issue 19).

Run ``python -m fastcps.analysis noise-levels|theorem1|residual-noise|reward-noise``.
"""

from fastcps.analysis.noise_levels import FLUX_MU_512, SCHEDULES, flux_mu, noise_level_table, total_noise
from fastcps.analysis.residual_noise import high_freq_energy, residual_noise
from fastcps.analysis.theorem1 import fit_order, theorem1

__all__ = [
    "FLUX_MU_512",
    "SCHEDULES",
    "fit_order",
    "flux_mu",
    "high_freq_energy",
    "noise_level_table",
    "residual_noise",
    "theorem1",
    "total_noise",
]
