"""Float64 oracles of the two fused ops, written op by op from docs/math.md and sharing no code with
fastcps (``cps_step_ref``/``cps_logprob_kl_ref`` run the same ``_step_math``/``_fwd_math`` family as the
CPU path, so a comparison with them checks the CPU path against itself).

Tolerance (tests/tolerance.py's rule, with the float64 oracle as the reference): the fused result may be
off the oracle by at most twice what PyTorch op by op in fp32 on the upcast inputs is off (the ops promise
fp32 math inside whatever the latent dtype), plus ``atol``, plus one ulp of a half output dtype at the
largest magnitude (the interpreter truncates bf16/fp16 where a GPU rounds) or, for an fp32 output, the
project's fp32 bound of 1e-6 relative to the largest magnitude (a few roundings of the final scalars)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tolerance import assert_close_lowp


class Step(NamedTuple):
    prev: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor


def _col(c, like, dtype):
    return c.detach().to(dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _close(name, got, want, base, out_dtype, atol):
    ulp = 1e-6 * float(want.abs().max()) if out_dtype == torch.float32 else None
    assert_close_lowp(name, got, want, base, out_dtype, atol=atol, ulp=ulp)


def step_math(x, v, c, *, noise=None, prev=None, dtype=torch.float64) -> Step:
    """x' = α·x + β·v + s·ε (or the given ``prev``) and lp_c − lp_w·mean((x' − μ)²), all in ``dtype``."""
    x, v = x.detach().to(dtype), v.detach().to(dtype)
    mean = _col(c.alpha, x, dtype) * x + _col(c.beta, x, dtype) * v
    prev = mean + _col(c.s, x, dtype) * noise.detach().to(dtype) if prev is None else prev.detach().to(dtype)
    dims = tuple(range(1, x.ndim))
    log_prob = c.lp_c.to(dtype) - c.lp_w.to(dtype) * ((prev - mean) ** 2).mean(dims)
    return Step(prev, log_prob, mean)


def logprob_kl_math(x, v, prev, v_ref, c, g_logp, g_kl, dtype=torch.float64):
    """(log-prob, KL, ∂v of Σ g_logp·logp + g_kl·kl) in ``dtype``; ∂v by autograd, not the closed form."""
    x, prev = x.detach().to(dtype), prev.detach().to(dtype)
    v = v.detach().to(dtype).requires_grad_(True)
    dims = tuple(range(1, x.ndim))
    mean = _col(c.alpha, x, dtype) * x + _col(c.beta, x, dtype) * v
    log_prob = c.lp_c.to(dtype) - c.lp_w.to(dtype) * ((prev - mean) ** 2).mean(dims)
    if v_ref is None:
        kl = torch.zeros_like(log_prob)
    else:
        kl = c.kl_w.to(dtype) * c.beta.to(dtype) ** 2 * ((v - v_ref.detach().to(dtype)) ** 2).mean(dims)
    (dv,) = torch.autograd.grad((log_prob * g_logp.to(dtype) + kl * g_kl.to(dtype)).sum(), v)
    return log_prob.detach(), kl.detach(), dv


def assert_step_close(out, x, v, c, noise=None, prev_sample=None, *, where=""):
    """A fused step's outputs against the oracle: x' and μ from the inputs, the log-prob from the x'
    the op returned (it must be the log-prob of the stored tensor, not of its unrounded value)."""
    dtype = x.dtype
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == x.shape[:1], where
    source = {"noise": noise} if prev_sample is None else {"prev": prev_sample}
    want, base = step_math(x, v, c, **source), step_math(x, v, c, **source, dtype=torch.float32)
    if prev_sample is None:
        assert out.prev_sample.dtype == dtype and out.prev_sample.shape == x.shape, where
        _close(f"prev_sample{where}", out.prev_sample, want.prev, base.prev.to(dtype), dtype, atol=0)
    else:
        assert out.prev_sample is prev_sample, where
    if out.mean is not None:
        assert out.mean.dtype == dtype and out.mean.shape == x.shape, where
        _close(f"mean{where}", out.mean, want.mean, base.mean.to(dtype), dtype, atol=0)
    scored = {"prev": out.prev_sample}
    want, base = step_math(x, v, c, **scored), step_math(x, v, c, **scored, dtype=torch.float32)
    _close(f"log_prob{where}", out.log_prob, want.log_prob, base.log_prob, torch.float32, atol=1e-9)


def assert_logprob_kl_close(got, x, v, prev, v_ref, c, g_logp, g_kl, *, where=""):
    """``got`` = (log-prob, KL, ∂v) of a fused forward and backward against the oracle."""
    lp, kl, dv = got
    want = logprob_kl_math(x, v, prev, v_ref, c, g_logp, g_kl)
    base = logprob_kl_math(x, v, prev, v_ref, c, g_logp, g_kl, dtype=torch.float32)
    assert lp.dtype == kl.dtype == torch.float32 and lp.shape == kl.shape == x.shape[:1], where
    assert dv.dtype == v.dtype and dv.shape == v.shape, where
    if v_ref is None:
        assert torch.equal(kl, torch.zeros_like(kl)), f"kl without v_ref{where}: {kl}"
    _close(f"log_prob{where}", lp, want[0], base[0], torch.float32, atol=1e-9)
    _close(f"kl{where}", kl, want[1], base[1], torch.float32, atol=1e-9)
    _close(f"dv{where}", dv, want[2], base[2].to(v.dtype), v.dtype, atol=1e-9)
