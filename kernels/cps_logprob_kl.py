"""Fused training forward/backward of a step's log-probability and KL (docs/math.md, "Log-probability of a
step",
"KL to the reference policy", "Gradients").

With ``d = x' − (α·x + β·v)``:

- forward, one pass over (x, v, x', v_ref): ``logp = lp_c − lp_w·mean(d²)``,
  ``kl = kl_w·β²·mean((v − v_ref)²)``;
- backward, one pass writing ∂v: ``grad_logp·(2·lp_w·β/N)·d + grad_kl·(2·kl_w·β²/N)·(v − v_ref)``.

Same launch shape as ``cps_step``: grid (B, chunks), per-chunk fp32 partial sums summed by torch
(deterministic, no atomics), tiling from ``kernels.cps_step.launch_config``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .cps_step import _N_LIMIT, FP_FUSION, launch_config

__all__ = ["LogprobKL", "cps_logprob_kl_bwd", "cps_logprob_kl_fwd"]


class LogprobKL(NamedTuple):
    logp: torch.Tensor  # (B,) fp32
    kl: torch.Tensor  # (B,) fp32, zeros when v_ref is None


@triton.jit
def _logprob_kl_fwd_kernel(
    x_ptr,
    v_ptr,
    prev_ptr,
    vref_ptr,
    alpha_ptr,
    beta_ptr,
    part_ptr,
    N,
    stride_x,
    stride_v,
    stride_prev,
    stride_vref,
    n_chunks,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    x_row = x_ptr + row * stride_x
    v_row = v_ptr + row * stride_v
    prev_row = prev_ptr + row * stride_prev
    if HAS_REF:
        vref_row = vref_ptr + row * stride_vref
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    cols0 = tl.arange(0, BLOCK)
    start = chunk * (BLOCK * ITERS)
    for i in range(ITERS):
        cols = start + i * BLOCK + cols0
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_row + cols, mask=mask, other=0.0).to(tl.float32)
        prev = tl.load(prev_row + cols, mask=mask, other=0.0).to(tl.float32)
        d = prev - (alpha * x + beta * v)  # masked lanes: 0 - 0 = 0
        acc_d += d * d
        if HAS_REF:
            vr = tl.load(vref_row + cols, mask=mask, other=0.0).to(tl.float32)
            dk = v - vr
            acc_k += dk * dk
    # part is (2, B, chunks): [0] sums of d², [1] sums of (v − v_ref)²
    base = row * n_chunks + chunk
    tl.store(part_ptr + base, tl.sum(acc_d, axis=0))
    if HAS_REF:
        tl.store(part_ptr + tl.num_programs(0).to(tl.int64) * n_chunks + base, tl.sum(acc_k, axis=0))


@triton.jit
def _logprob_kl_bwd_kernel(
    x_ptr,
    v_ptr,
    prev_ptr,
    vref_ptr,
    dv_ptr,
    alpha_ptr,
    beta_ptr,
    lp_w_ptr,
    kl_w_ptr,
    g_lp_ptr,
    g_kl_ptr,
    N,
    stride_x,
    stride_v,
    stride_prev,
    stride_vref,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    # NaN lp_w (Gaussian form at s = 0) propagates into dv on purpose: such steps are not trained.
    c_lp = tl.load(g_lp_ptr + row) * (2.0 * tl.load(lp_w_ptr + row) * beta / N)
    x_row = x_ptr + row * stride_x
    v_row = v_ptr + row * stride_v
    prev_row = prev_ptr + row * stride_prev
    dv_row = dv_ptr + row * N
    if HAS_REF:
        vref_row = vref_ptr + row * stride_vref
        c_kl = tl.load(g_kl_ptr + row) * (2.0 * tl.load(kl_w_ptr + row) * beta * beta / N)
    cols0 = tl.arange(0, BLOCK)
    start = chunk * (BLOCK * ITERS)
    for i in range(ITERS):
        cols = start + i * BLOCK + cols0
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_row + cols, mask=mask, other=0.0).to(tl.float32)
        prev = tl.load(prev_row + cols, mask=mask, other=0.0).to(tl.float32)
        dv = c_lp * (prev - (alpha * x + beta * v))
        if HAS_REF:
            vr = tl.load(vref_row + cols, mask=mask, other=0.0).to(tl.float32)
            dv += c_kl * (v - vr)
        tl.store(dv_row + cols, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _cfg(x, v, prev_sample, v_ref, block, num_warps, iters):
    B, N = x.shape
    if N > _N_LIMIT:
        raise ValueError(f"rows of {N} elements exceed the kernel's int32 in-row offsets ({_N_LIMIT})")
    sizes = [t.element_size() for t in (x, v, prev_sample, v_ref) if t is not None]
    return launch_config(B, N, sizes, block=block, num_warps=num_warps, iters=iters)


def cps_logprob_kl_fwd(
    x, v, prev_sample, v_ref, alpha, beta, lp_w, lp_c, kl_w, *, block=None, num_warps=None, iters=None
):
    """Training forward, one pass. d = prev - (alpha*x + beta*v).

    logp[b] = lp_c[b] - lp_w[b]*mean_n(d^2); kl[b] = kl_w[b]*beta[b]^2*mean_n((v - v_ref)^2)
    (v_ref may be None -> kl = zeros, v_ref never loaded). Returns LogprobKL(logp, kl), each fp32 (B,).
    ``block``/``num_warps``/``iters`` override the launch heuristics (testing).
    """
    B, N = x.shape
    has_ref = v_ref is not None
    if B == 0 or N == 0:
        nan = torch.full((B,), float("nan"), dtype=torch.float32, device=x.device)
        kl = kl_w * beta * beta * nan if has_ref else torch.zeros((B,), dtype=torch.float32, device=x.device)
        return LogprobKL(lp_c - lp_w * nan, kl)
    cfg = _cfg(x, v, prev_sample, v_ref, block, num_warps, iters)
    part = torch.empty((2 if has_ref else 1, B, cfg.chunks), dtype=torch.float32, device=x.device)
    _logprob_kl_fwd_kernel[(B, cfg.chunks)](
        x,
        v,
        prev_sample,
        v_ref,
        alpha,
        beta,
        part,
        N,
        x.stride(0),
        v.stride(0),
        prev_sample.stride(0),
        v_ref.stride(0) if has_ref else 0,
        cfg.chunks,
        HAS_REF=has_ref,
        BLOCK=cfg.block,
        ITERS=cfg.iters,
        num_warps=cfg.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    sums = part.sum(2)
    logp = lp_c - lp_w * (sums[0] / N)
    if has_ref:
        kl = kl_w * (beta * beta) * (sums[1] / N)
    else:
        kl = torch.zeros((B,), dtype=torch.float32, device=x.device)
    return LogprobKL(logp, kl)


def cps_logprob_kl_bwd(
    x,
    v,
    prev_sample,
    v_ref,
    alpha,
    beta,
    lp_w,
    kl_w,
    grad_logp,
    grad_kl,
    *,
    block=None,
    num_warps=None,
    iters=None,
):
    """One pass writing dv (B,N) in v.dtype:
    dv = grad_logp[b]*(2*lp_w[b]*beta[b]/N)*d + grad_kl[b]*(2*kl_w[b]*beta[b]^2/N)*(v - v_ref)
    (second term absent when v_ref is None). grad_logp, grad_kl are fp32 (B,).
    ``block``/``num_warps``/``iters`` override the launch heuristics (testing).
    """
    B, N = x.shape
    has_ref = v_ref is not None
    dv = torch.empty((B, N), dtype=v.dtype, device=v.device)
    if B == 0 or N == 0:
        return dv
    cfg = _cfg(x, v, prev_sample, v_ref, block, num_warps, iters)
    _logprob_kl_bwd_kernel[(B, cfg.chunks)](
        x,
        v,
        prev_sample,
        v_ref,
        dv,
        alpha,
        beta,
        lp_w,
        kl_w if has_ref else None,
        grad_logp,
        grad_kl if has_ref else None,
        N,
        x.stride(0),
        v.stride(0),
        prev_sample.stride(0),
        v_ref.stride(0) if has_ref else 0,
        HAS_REF=has_ref,
        BLOCK=cfg.block,
        ITERS=cfg.iters,
        num_warps=cfg.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    return dv


def compile_variants(batch: int = 1):
    """(name, kernel, signature, constexprs, num_warps) for ``bench/ptx_report.py``: each uniform
    latent dtype × with/without v_ref, forward and backward, at the tiling of a (batch, 4096·64) latent."""
    out = []
    for tname, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg = launch_config(batch, 4096 * 64, [torch_dtype.itemsize])
        lat = f"*{tname}"
        for has_ref in (False, True):
            ref = lat if has_ref else "constexpr"
            sig = {
                "x_ptr": lat,
                "v_ptr": lat,
                "prev_ptr": lat,
                "vref_ptr": ref,
                "alpha_ptr": "*fp32",
                "beta_ptr": "*fp32",
                "part_ptr": "*fp32",
                "N": "i32",
                "stride_x": "i32",
                "stride_v": "i32",
                "stride_prev": "i32",
                "stride_vref": "i32",
                "n_chunks": "i32",
                "HAS_REF": "constexpr",
                "BLOCK": "constexpr",
                "ITERS": "constexpr",
            }
            consts = {"HAS_REF": has_ref, "BLOCK": cfg.block, "ITERS": cfg.iters}
            if not has_ref:
                consts["vref_ptr"] = None
            tag = ",ref" if has_ref else ""
            out.append(
                (
                    f"logprob_kl_fwd[{tname}{tag}]@B={batch}",
                    _logprob_kl_fwd_kernel,
                    sig,
                    consts,
                    cfg.num_warps,
                )
            )
            sig = {
                "x_ptr": lat,
                "v_ptr": lat,
                "prev_ptr": lat,
                "vref_ptr": ref,
                "dv_ptr": lat,
                "alpha_ptr": "*fp32",
                "beta_ptr": "*fp32",
                "lp_w_ptr": "*fp32",
                "kl_w_ptr": "*fp32" if has_ref else "constexpr",
                "g_lp_ptr": "*fp32",
                "g_kl_ptr": "*fp32" if has_ref else "constexpr",
                "N": "i32",
                "stride_x": "i32",
                "stride_v": "i32",
                "stride_prev": "i32",
                "stride_vref": "i32",
                "HAS_REF": "constexpr",
                "BLOCK": "constexpr",
                "ITERS": "constexpr",
            }
            consts = {"HAS_REF": has_ref, "BLOCK": cfg.block, "ITERS": cfg.iters}
            if not has_ref:
                consts.update(vref_ptr=None, kl_w_ptr=None, g_kl_ptr=None)
            out.append(
                (
                    f"logprob_kl_bwd[{tname}{tag}]@B={batch}",
                    _logprob_kl_bwd_kernel,
                    sig,
                    consts,
                    cfg.num_warps,
                )
            )
    return out
