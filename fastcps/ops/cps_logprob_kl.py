"""Training op: per-sample log-prob of a stored x' and KL to the reference policy, with the fused
backward that writes ∂v in one pass (MATH.md, "Gradients").

``cps_logprob_kl_ref`` is the plain fp32 PyTorch oracle (differentiable by autograd, used for
gradcheck); ``cps_logprob_kl`` runs the Triton kernels on CUDA and the compiled reference math on
CPU, both behind one ``torch.autograd.Function`` that saves only its inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastcps.ops.checks import as_rows, check_coeff, check_latent
from fastcps.ops.dispatch import choose_impl, maybe_compile
from fastcps.samplers import StepCoeffs


class LogprobKL(NamedTuple):
    log_prob: torch.Tensor  # (B,) fp32: lp_c − lp_w·mean((x' − μ)²)
    kl: torch.Tensor  # (B,) fp32: kl_w·β²·mean((v − v_ref)²); zeros without v_ref


def _col(c):
    return c.reshape(-1, 1)


def _up(t):
    """fp32 for half types; fp64 stays fp64 so gradcheck can run the oracle in double."""
    return t if t.dtype == torch.float64 else t.float()


def cps_logprob_kl_ref(x, v, prev_sample, alpha, beta, lp_w, lp_c, kl_w, v_ref=None) -> LogprobKL:
    """fp32 oracle on (B, ...) tensors; autograd flows to ``v`` (and to anything else that asks)."""
    b = x.shape[0]
    x, v, prev = (_up(t.reshape(b, -1)) for t in (x, v, prev_sample))
    d = prev - (_col(alpha) * x + _col(beta) * v)
    logp = lp_c - lp_w * (d * d).mean(dim=1)
    if v_ref is None:
        return LogprobKL(logp, torch.zeros_like(logp))
    dv = v - _up(v_ref.reshape(b, -1))
    return LogprobKL(logp, kl_w * beta * beta * (dv * dv).mean(dim=1))


def _fwd_math(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w):
    d = prev.float() - (_col(alpha) * x.float() + _col(beta) * v.float())
    logp = lp_c - lp_w * (d * d).mean(dim=1)
    if v_ref is None:
        return logp, torch.zeros_like(logp)
    dv = v.float() - v_ref.float()
    return logp, kl_w * beta * beta * (dv * dv).mean(dim=1)


def _bwd_math(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl):
    n = x.shape[1]
    d = prev.float() - (_col(alpha) * x.float() + _col(beta) * v.float())
    grad = _col(g_logp * 2.0 * lp_w * beta / n) * d
    if v_ref is not None:
        grad = grad + _col(g_kl * 2.0 * kl_w * beta * beta / n) * (v.float() - v_ref.float())
    return grad.to(v.dtype)


_fwd_compiled = maybe_compile(_fwd_math)
_bwd_compiled = maybe_compile(_bwd_math)


class _LogprobKLFunction(torch.autograd.Function):
    """Gradient flows only to v: x and x' are data, v_ref is the frozen reference, the coefficients
    are functions of σ."""

    @staticmethod
    def forward(ctx, v, x, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w, impl):
        if impl == "triton":
            from fastcps.kernels import cps_logprob_kl_fwd

            logp, kl = cps_logprob_kl_fwd(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w)
        else:
            logp, kl = _fwd_compiled(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w)
        ctx.impl = impl
        ctx.save_for_backward(x, v, prev, v_ref, alpha, beta, lp_w, kl_w)
        return logp, kl

    @staticmethod
    def backward(ctx, g_logp, g_kl):
        x, v, prev, v_ref, alpha, beta, lp_w, kl_w = ctx.saved_tensors
        g_logp = torch.zeros_like(alpha) if g_logp is None else g_logp.float().contiguous()
        g_kl = torch.zeros_like(alpha) if g_kl is None else g_kl.float().contiguous()
        if ctx.impl == "triton":
            from fastcps.kernels import cps_logprob_kl_bwd

            dv = cps_logprob_kl_bwd(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl)
        else:
            dv = _bwd_compiled(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl)
        return dv, None, None, None, None, None, None, None, None, None


def cps_logprob_kl(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    prev_sample: torch.Tensor,
    coeffs: StepCoeffs,
    ref_model_output: torch.Tensor | None = None,
) -> LogprobKL:
    """Per-sample log-prob of ``prev_sample`` under the step from ``sample`` with velocity
    ``model_output``, and KL to the reference velocity ``ref_model_output`` (optional).

    Latents are (B, ...) of any float dtype (fp32 math inside); gradients reach ``model_output``.
    """
    x = check_latent("sample", sample)
    v = check_latent("model_output", model_output, x)
    check_latent("prev_sample", prev_sample, x)
    if ref_model_output is not None:
        check_latent("ref_model_output", ref_model_output, x)
        ref_model_output = as_rows(ref_model_output.detach())
    b = x.shape[0]
    alpha, beta, lp_w, lp_c, kl_w = (
        check_coeff(n, getattr(coeffs, n), b, x.device) for n in ("alpha", "beta", "lp_w", "lp_c", "kl_w")
    )
    impl = choose_impl(x)
    logp, kl = _LogprobKLFunction.apply(
        as_rows(v), as_rows(x.detach()), as_rows(prev_sample.detach()), ref_model_output,
        alpha, beta, lp_w, lp_c, kl_w, impl,
    )
    return LogprobKL(logp, kl)
