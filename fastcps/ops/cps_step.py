"""The rollout step: x' = α·x + β·v + s·ε and, in the same pass, the log-prob of the x' written.

``cps_step_ref`` is the plain fp32 PyTorch oracle (tests, benchmarks, CPU fallback); ``cps_step``
validates its arguments and calls the operator ``torch.ops.fastcps.cps_step``, which runs the Triton
kernel on CUDA tensors and the compiled reference on CPU (``fastcps.ops.dispatch.choose_impl``).

The operators (this file and ``cps_logprob_kl.py``) are ``torch.library.custom_op``s with a fake
(meta) kernel and an autograd formula, opaque to torch.compile, rather than ``triton_op``s. Why:
their bodies choose at run time between the Triton launcher (whose tiling heuristics are Python on
concrete shapes), inductor's compile of the reference on CPU and Triton's interpreter (tests), and
``triton_op`` would trace that body as its fake kernel and again inside every compiled graph, where
the nested ``torch.compile`` and the env-var dispatch have no place. Inductor gains little from seeing
inside: each kernel is already one pass over memory and reads any float dtype, so there is no cast
or pointwise neighbour worth fusing into it. Opaque ops still trace (``fullgraph=True``), run under
``FakeTensorMode`` without launching anything, and pass ``torch.library.opcheck``.

Custom ops cannot return None or alias an input, so the operator returns an empty (0,) tensor for
an output not asked for (x' when ``prev_sample`` is given, μ without ``return_mean``) and
``cps_step`` maps those back to the caller's ``prev_sample`` and None.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastcps.ops.checks import as_rows, check_coeff, check_latent, check_op_inputs
from fastcps.ops.cps_logprob_kl import cps_logprob_kl_backward_op
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
    prev, logp, mean = _step_math(
        x.reshape(b, -1), v.reshape(b, -1), alpha, beta, std, lp_w, lp_c, eps, given
    )
    prev = prev_sample if prev_sample is not None else prev.reshape(x.shape)
    return StepResult(prev, logp, mean.reshape(x.shape))


_step_math_compiled = maybe_compile(_step_math)


def _step_reference(x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed, offset, return_mean):
    """The CPU (or ``FASTCPS_IMPL=torch``) body of the operator: Philox ε for a seed, then the math."""
    if seed is not None:
        from fastcps.ops.philox import philox_randn

        counters = offset + torch.arange(x.numel(), dtype=torch.int64, device=x.device)
        noise = philox_randn(seed, counters).reshape(x.shape)
    prev, logp, mean = _step_math_compiled(
        x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, return_mean
    )
    if prev_sample is None and prev.dtype != torch.float32:
        # Inductor may fuse away the round trip through the half dtype; score the x' as stored.
        logp = _step_math_compiled(x, v, alpha, beta, std, lp_w, lp_c, None, prev, False)[1]
    return None if prev_sample is not None else prev, logp, mean


def _check_step(x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed):
    sources = (noise is not None) + (seed is not None) + (prev_sample is not None)
    if sources != 1:
        raise ValueError(f"fastcps::cps_step needs exactly one of noise, seed or prev_sample (got {sources})")
    check_op_inputs(
        "fastcps::cps_step",
        x,
        {"v": v, "noise": noise, "prev_sample": prev_sample},
        {"alpha": alpha, "beta": beta, "std": std, "lp_w": lp_w, "lp_c": lp_c},
    )


@torch.library.custom_op("fastcps::cps_step", mutates_args=())
def cps_step_op(
    x: Tensor,
    v: Tensor,
    alpha: Tensor,
    beta: Tensor,
    std: Tensor,
    lp_w: Tensor,
    lp_c: Tensor,
    noise: Optional[Tensor],
    prev_sample: Optional[Tensor],
    seed: Optional[int],
    offset: int,
    return_mean: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x', logp, μ) of (B, N) rows: x' (B, N) in x's dtype, or (0,) when ``prev_sample`` is given;
    logp (B,) fp32; μ (B, N) in x's dtype with ``return_mean``, else (0,). Gradient: to v only."""
    _check_step(x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed)
    if choose_impl(x) == "triton":
        from fastcps.kernels.cps_step import cps_step_fwd

        prev, logp, mean = cps_step_fwd(
            x,
            v,
            alpha,
            beta,
            std,
            lp_w,
            lp_c,
            noise=noise,
            seed=seed,
            offset=offset,
            prev_sample=prev_sample,
            return_mean=return_mean,
        )
    else:
        prev, logp, mean = _step_reference(
            x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed, offset, return_mean
        )
    empty = x.new_empty((0,))
    return (
        empty if prev is None else prev.contiguous(),
        logp.contiguous(),
        empty.clone() if mean is None else mean.contiguous(),
    )


@cps_step_op.register_fake
def _(x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed, offset, return_mean):
    _check_step(x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed)
    return (
        x.new_empty((0,)) if prev_sample is not None else x.new_empty(x.shape),
        x.new_empty(x.shape[:1], dtype=torch.float32),
        x.new_empty(x.shape) if return_mean else x.new_empty((0,)),
    )


def _step_setup_context(ctx, inputs, output):
    x, v, alpha, beta, std, lp_w, lp_c, noise, prev_sample, seed, offset, return_mean = inputs
    ctx.scoring, ctx.return_mean = prev_sample is not None, return_mean
    ctx.save_for_backward(x, v, prev_sample, alpha, beta, lp_w)


def _step_backward(ctx, g_prev, g_logp, g_mean):
    """∂v only, as for the training op (x, ε and a given x' are data; coefficients are functions of σ).
    x' and μ move by β per unit of v (straight through the cast to x's dtype). Drawing x', x' − μ = s·ε
    does not depend on v, so the log-prob has no v-gradient; scoring a given x' it has the training
    op's, computed by its fused backward."""
    x, v, prev_sample, alpha, beta, lp_w = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:
        return (None,) * 12
    terms = [
        beta.reshape(-1, 1) * g.float()
        for g, present in ((g_prev, not ctx.scoring), (g_mean, ctx.return_mean))
        if g is not None and present
    ]
    if ctx.scoring and g_logp is not None:
        terms.append(
            cps_logprob_kl_backward_op(
                x, v, prev_sample, None, alpha, beta, lp_w, None, g_logp.float().contiguous(), None
            ).float()
        )
    dv = sum(terms[1:], terms[0]).to(v.dtype) if terms else None
    return (None, dv) + (None,) * 10


cps_step_op.register_autograd(_step_backward, setup_context=_step_setup_context)


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
    Gradients (rarely wanted from a rollout) reach ``model_output`` only.
    """
    x = check_latent("sample", sample)
    v = check_latent("model_output", model_output, x)
    sources = sum(a is not None for a in (noise, seed, prev_sample))
    if sources != 1:
        raise ValueError(
            "cps_step needs exactly one of noise, seed or prev_sample "
            f"(got {sources}); use prev_sample to score a given x'"
        )
    if noise is not None:
        check_latent("noise", noise, x)
    if prev_sample is not None:
        check_latent("prev_sample", prev_sample, x)
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"argument 'seed' must be a Python int, got {type(seed).__name__}")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise ValueError(f"argument 'seed' must fit in int64 (the kernel's seed type), got {seed}")
    b = x.shape[0]
    alpha, beta, std, lp_w, lp_c = (
        check_coeff(n, getattr(coeffs, n), b, x.device) for n in ("alpha", "beta", "s", "lp_w", "lp_c")
    )
    prev, logp, mean = torch.ops.fastcps.cps_step(
        as_rows(x.detach()),
        as_rows(v),
        alpha,
        beta,
        std,
        lp_w,
        lp_c,
        None if noise is None else as_rows(noise.detach()),
        None if prev_sample is None else as_rows(prev_sample.detach()),
        seed,
        offset,
        return_mean,
    )
    prev = prev_sample if prev_sample is not None else prev.reshape(x.shape)
    return StepResult(prev, logp, mean.reshape(x.shape) if return_mean else None)
