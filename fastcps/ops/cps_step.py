"""The rollout step: x' = α·x + β·v + s·ε and, in the same pass, the log-prob of the x' written.

``cps_step_ref`` is the plain fp32 PyTorch oracle (tests, benchmarks, CPU fallback);
``cps_step`` dispatches to the Triton kernel (CUDA) or the compiled reference (CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastcps.ops.checks import as_rows, check_coeff, check_latent
from fastcps.ops.dispatch import choose_impl, maybe_compile
from fastcps.samplers import StepCoeffs


class StepResult(NamedTuple):
    prev_sample: torch.Tensor  # x', same shape and dtype as the input sample
    log_prob: torch.Tensor  # (B,) fp32: lp_c − lp_w·mean((x' − μ)²) of the x' returned
    mean: torch.Tensor | None  # μ = α·x + β·v in the sample's dtype, when asked for


def _col(c: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, 1)


def _step_math(x, v, alpha, beta, std, lp_w, lp_c, noise, prev, want_mean: bool = True):
    """(B, N) fp32 math of one step; ``noise`` or ``prev`` is None. Returns (prev, logp, mean);
    ``want_mean=False`` skips storing μ (one full-size write less in the compiled loop)."""
    mean = _col(alpha) * x.float() + _col(beta) * v.float()
    if prev is None:
        prev = (mean + _col(std) * noise.float()).to(x.dtype)
    d = prev.float() - mean
    logp = lp_c - lp_w * (d * d).mean(dim=1)
    return prev, logp, mean.to(x.dtype) if want_mean else None


def cps_step_ref(x, v, alpha, beta, std, lp_w, lp_c, *, noise=None, prev_sample=None):
    """Plain fp32 PyTorch oracle on (B, ...) tensors. Exactly one of ``noise``/``prev_sample``.

    The log-prob is computed from x' as stored (rounded to the sample's dtype) so that it is the
    log-prob of the tensor the caller gets back.
    """
    if (noise is None) == (prev_sample is None):
        raise ValueError("cps_step_ref needs exactly one of noise or prev_sample")
    b = x.shape[0]
    given = None if prev_sample is None else prev_sample.reshape(b, -1)
    eps = None if noise is None else noise.reshape(b, -1)
    prev, logp, mean = _step_math(x.reshape(b, -1), v.reshape(b, -1), alpha, beta, std, lp_w, lp_c, eps, given)
    prev = prev_sample if prev_sample is not None else prev.reshape(x.shape)
    return StepResult(prev, logp, mean.reshape(x.shape))


_step_math_compiled = maybe_compile(_step_math)


def cps_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: StepCoeffs,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    prev_sample: torch.Tensor | None = None,
    return_mean: bool = False,
) -> StepResult:
    """One fused step on (B, ...) latents of any float dtype (fp32 math inside).

    Exactly one source of x': ``noise`` (ε given), ``seed`` (Philox ε generated in the kernel, element
    (b, n) uses counter ``offset + b·N + n``, so the same seed gives the same x' on any launch shape;
    give each step its own seed or offset), or ``prev_sample`` (nothing drawn, only its log-prob).
    """
    x = check_latent("sample", sample)
    v = check_latent("model_output", model_output, x)
    sources = sum(a is not None for a in (noise, seed, prev_sample))
    if sources != 1:
        raise ValueError("cps_step needs exactly one of noise, seed or prev_sample "
                         f"(got {sources}); use prev_sample to score a given x'")
    if noise is not None:
        check_latent("noise", noise, x)
    if prev_sample is not None:
        check_latent("prev_sample", prev_sample, x)
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"argument 'seed' must be a Python int, got {type(seed).__name__}")
    b = x.shape[0]
    alpha, beta, std, lp_w, lp_c = (
        check_coeff(n, getattr(coeffs, n), b, x.device) for n in ("alpha", "beta", "s", "lp_w", "lp_c")
    )
    x2, v2 = as_rows(x), as_rows(v)
    n2 = None if noise is None else as_rows(noise)
    p2 = None if prev_sample is None else as_rows(prev_sample)

    if choose_impl(x) == "triton":
        from fastcps.kernels import cps_step_fwd

        prev, logp, mean = cps_step_fwd(x2, v2, alpha, beta, std, lp_w, lp_c, noise=n2, seed=seed,
                                        offset=offset, prev_sample=p2, return_mean=return_mean)
    else:
        if seed is not None:
            from fastcps.ops.philox import philox_randn

            counters = offset + torch.arange(x2.numel(), dtype=torch.int64, device=x.device)
            n2 = philox_randn(seed, counters).reshape(x2.shape)
        prev, logp, mean = _step_math_compiled(x2, v2, alpha, beta, std, lp_w, lp_c, n2, p2, return_mean)
        if p2 is None and prev.dtype != torch.float32:
            # Inductor may fuse away the round trip through the half dtype; score the x' as stored.
            logp = _step_math_compiled(x2, v2, alpha, beta, std, lp_w, lp_c, None, prev, False)[1]
    prev = prev_sample if prev_sample is not None else prev.reshape(x.shape)
    return StepResult(prev, logp, None if mean is None else mean.reshape(x.shape))
