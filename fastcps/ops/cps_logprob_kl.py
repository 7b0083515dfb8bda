"""Training op: per-sample log-prob of a stored x' and KL to the reference policy, with the fused
backward that writes ∂v in one pass (docs/math.md, "Gradients").

``cps_logprob_kl_ref`` is the plain fp32 PyTorch oracle (differentiable by autograd, used for
gradcheck); ``cps_logprob_kl`` validates its arguments and calls the operator
``torch.ops.fastcps.cps_logprob_kl``, whose backward is the operator
``torch.ops.fastcps.cps_logprob_kl_backward``; both run the Triton kernels on CUDA and the compiled
reference math on CPU (``fastcps.ops.dispatch.choose_impl``). Why ``custom_op`` (opaque to
torch.compile) rather than ``triton_op``: see ``fastcps/ops/cps_step.py``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastcps.ops.checks import as_rows, check_coeff, check_latent, check_op_inputs
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


@torch.library.custom_op("fastcps::cps_logprob_kl", mutates_args=())
def cps_logprob_kl_op(
    x: Tensor,
    v: Tensor,
    prev: Tensor,
    v_ref: Optional[Tensor],
    alpha: Tensor,
    beta: Tensor,
    lp_w: Tensor,
    lp_c: Tensor,
    kl_w: Tensor,
) -> tuple[Tensor, Tensor]:
    """(logp, kl), each (B,) fp32, of (B, N) rows; kl is zeros without ``v_ref``. Gradient: to v only."""
    _check_fwd(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w)
    if choose_impl(x) == "triton":
        from fastcps.kernels.cps_logprob_kl import cps_logprob_kl_fwd

        logp, kl = cps_logprob_kl_fwd(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w)
    else:
        logp, kl = _fwd_compiled(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w)
    return logp.contiguous(), kl.contiguous()


def _check_fwd(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w):
    check_op_inputs(
        "fastcps::cps_logprob_kl",
        x,
        {"v": v, "prev": prev, "v_ref": v_ref},
        {"alpha": alpha, "beta": beta, "lp_w": lp_w, "lp_c": lp_c, "kl_w": kl_w},
    )


@cps_logprob_kl_op.register_fake
def _(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w):
    _check_fwd(x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w)
    return x.new_empty(x.shape[:1], dtype=torch.float32), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("fastcps::cps_logprob_kl_backward", mutates_args=())
def cps_logprob_kl_backward_op(
    x: Tensor,
    v: Tensor,
    prev: Tensor,
    v_ref: Optional[Tensor],
    alpha: Tensor,
    beta: Tensor,
    lp_w: Tensor,
    kl_w: Optional[Tensor],
    g_logp: Tensor,
    g_kl: Optional[Tensor],
) -> Tensor:
    """∂v (B, N) in v's dtype from the (B,) fp32 output gradients; ``kl_w``/``g_kl`` go with ``v_ref``."""
    _check_bwd(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl)
    if choose_impl(x) == "triton":
        from fastcps.kernels.cps_logprob_kl import cps_logprob_kl_bwd

        return cps_logprob_kl_bwd(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl)
    return _bwd_compiled(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl).contiguous()


def _check_bwd(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl):
    if v_ref is not None and (kl_w is None or g_kl is None):
        raise ValueError("fastcps::cps_logprob_kl_backward: with v_ref, give kl_w and g_kl too")
    check_op_inputs(
        "fastcps::cps_logprob_kl_backward",
        x,
        {"v": v, "prev": prev, "v_ref": v_ref},
        {
            "alpha": alpha,
            "beta": beta,
            "lp_w": lp_w,
            "g_logp": g_logp,
            **({} if v_ref is None else {"kl_w": kl_w, "g_kl": g_kl}),
        },
    )


@cps_logprob_kl_backward_op.register_fake
def _(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl):
    _check_bwd(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl)
    return v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    x, v, prev, v_ref, alpha, beta, lp_w, lp_c, kl_w = inputs
    ctx.save_for_backward(x, v, prev, v_ref, alpha, beta, lp_w, kl_w)


def _backward(ctx, g_logp, g_kl):
    """Gradient flows only to v: x and x' are data, v_ref is the frozen reference, the coefficients
    are functions of σ (their gradients are None)."""
    x, v, prev, v_ref, alpha, beta, lp_w, kl_w = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:
        return (None,) * 9
    g_logp = torch.zeros_like(alpha) if g_logp is None else g_logp.float().contiguous()
    if v_ref is None:
        kl_w = g_kl = None
    else:
        g_kl = torch.zeros_like(alpha) if g_kl is None else g_kl.float().contiguous()
    dv = torch.ops.fastcps.cps_logprob_kl_backward(x, v, prev, v_ref, alpha, beta, lp_w, kl_w, g_logp, g_kl)
    return None, dv, None, None, None, None, None, None, None


cps_logprob_kl_op.register_autograd(_backward, setup_context=_setup_context)


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
    logp, kl = torch.ops.fastcps.cps_logprob_kl(
        as_rows(x.detach()),
        as_rows(v),
        as_rows(prev_sample.detach()),
        ref_model_output,
        alpha,
        beta,
        lp_w,
        lp_c,
        kl_w,
    )
    return LogprobKL(logp, kl)
