"""Fused rollout step: ``prev = α·x + β·v + s·ε`` and its log-probability, one pass over memory.

docs/math.md, "One shape for every sampler": every sampler in scope is ``μ = α·x + β·v``, ``x' = μ + s·ε``,
``logp = lp_c − lp_w·mean((x' − μ)²)``; only the per-sample fp32 scalars differ, and they are read
from (B,) tensors (never float constexprs: σ changes every step and would recompile the kernel).

Launch shape. Latents are (B, N) with unit last-dim stride. The grid is (B, chunks): each program
walks ``ITERS`` blocks of ``BLOCK`` elements of one row and writes one fp32 partial sum of (x' − μ)²
into a (B, chunks) buffer that torch then sums over chunks: deterministic (fixed order, no atomics)
and enough programs at B = 1 (N = 4096·64 fp32 gives 512 programs of 512 elements) to fill an H100's
132 SMs. See ``launch_config`` for the heuristics (no autotune: the interpreter runs one config).

Noise by seed. ``noise[b, n] = tl.randn(seed, offset + b·N + n)`` with an int64 counter, so a seed
gives the same ``prev`` whatever BLOCK, ITERS or the grid are, and ``fastcps.ops.philox.philox_randn``
reproduces it on CPU. The kernel spells it ``_randn``: tl.randn bit for bit, without the local memory
of libdevice cosf's slow path (see ``_cosf_fast_path``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["LaunchConfig", "StepOut", "cps_step_fwd", "launch_config"]

# Programs to aim for: ~8 per SM of an H100 (132 SMs) so that every SM keeps several 16-byte loads
# per thread in flight; more would only grow the partial-sum buffer.
_TARGET_PROGRAMS = 1024
_MAX_ITERS = 64
# In-row offsets are int32 (a chunk may overrun N by BLOCK·ITERS ≤ 2**16); row offsets are int64,
# so B·N may exceed 2**31.
_N_LIMIT = 2**31 - 2**17

# FMA contraction (a·b + c rounded once) is pinned at every launch: Triton 3.9 defaults it on but warns
# that 3.10 turns it off, which would change the kernels' rounding with a Triton upgrade. On keeps the
# numerics every measurement so far was made with; the kernels are memory-bound, so speed is the same.
FP_FUSION = True

MODE_NOISE = 0  # noise tensor given
MODE_SEED = 1  # noise drawn in-kernel by tl.randn
MODE_PREV = 2  # prev_sample given: log-prob only


class LaunchConfig(NamedTuple):
    block: int  # elements per block (power of two)
    num_warps: int
    iters: int  # blocks per program (constexpr)
    chunks: int  # programs per row: the grid is (B, chunks)


class StepOut(NamedTuple):
    prev: torch.Tensor | None  # (B, N) x.dtype, None when prev_sample was given
    logp: torch.Tensor  # (B,) fp32
    mean: torch.Tensor | None  # (B, N) x.dtype when return_mean


def launch_config(B: int, N: int, itemsizes, *, block=None, num_warps=None, iters=None) -> LaunchConfig:
    """BLOCK/num_warps/ITERS/chunks for a (B, N) elementwise-plus-row-reduction kernel.

    - 16 bytes per thread per access for the narrowest latent dtype: VEC = 16 // min(itemsize)
      (fp32: 4, bf16/fp16: 8); BLOCK = VEC·32·num_warps with 4 warps (512 fp32 / 1024 half
      elements). Wider dtypes in the same kernel then load 2×16 bytes per thread.
    - Small rows shrink BLOCK (and warps) to the next power of two ≥ N, so N = 3 does not mask off
      511 of 512 lanes.
    - ITERS (a power of two, ≤ 64, a constexpr so chunk starts keep their 16-element divisibility)
      is the smallest that keeps B·chunks near ``_TARGET_PROGRAMS``.
    ``block``/``num_warps``/``iters`` override the heuristics (tests use them to show that results do
    not depend on the tiling).
    """
    vec = 16 // min(itemsizes)
    if block is None:
        nw = 4 if num_warps is None else num_warps
        block = vec * 32 * nw
        if N < block:
            block = max(triton.next_power_of_2(N), 32)
    if num_warps is None:
        num_warps = max(1, min(4, block // (vec * 32)))
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    n_blocks = triton.cdiv(N, block)
    if iters is None:
        want = max(1, _TARGET_PROGRAMS // max(B, 1))
        iters = min(triton.next_power_of_2(triton.cdiv(n_blocks, want)), _MAX_ITERS)
    chunks = triton.cdiv(n_blocks, iters)
    return LaunchConfig(block, num_warps, iters, chunks)


@triton.jit
def _cosf_fast_path(th):
    """libdevice's ``__nv_cosf`` (what ``tl.cos`` calls) without its slow path: the same fp32 operations
    on the same constants, so for every angle ``tl.randn`` draws it gives ``tl.cos(th)`` bit for bit.

    Why not ``tl.cos``: cosf reduces |th| >= 105615 with Payne-Hanek, whose 7-word table lives in local
    memory; with ptxas 12.9.86 (Triton 3.8.0) every seeded cps_step variant drawing ``tl.randn`` had a
    32 B stack frame, 32-64 B of STL and 48-96 B of LDL (on that never-taken path: Box-Muller's angle
    stays in [0, 2π)), which the PTX report (bench/ptx_report.py) counts as local memory.

    Transcribed from the sm_90 PTX of ``tl.cos`` (Triton 3.8.0's libdevice; 3.9.0's gives the same fast
    path): q = rint(th·2/π) (mul.f32, cvt.rni), r = th - q·π/2 by three fma with a three-part π/2, the
    sin polynomial (q odd) or the cos one (q even) in z = r², negated when bit 1 of q + 1 is set.
    Where this differs from libdevice, no bit changes for any angle tl.randn can draw (all 75,497,472,
    in an exact-fma fp32 emulation of both; tests/test_philox.py checks a sample and the ties of the
    rint): th·2/π as fma(th, 2/π, +0) and rint by the 1.5·2**23 trick (the interpreter has no cvt.rni,
    and with no product feeding an add fp fusion has nothing to contract); both polynomials, then a
    select, for libdevice's branch on q (fewer registers); z for its fma(z, 1, +0) (z = r² >= +0);
    no ftz (libdevice is linked with ftz; none of these values is subnormal); 0 - res for its
    fma(res, -1, 0) (equal for every res, zeros included).
    """
    t = tl.fma(th, 0.6366197466850281, 0.0)  # 0x3F22F983 (2/π)
    q = (t + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000  # rint(t), ties to even
    j = q.to(tl.float32)
    r = tl.fma(j, -1.570796251296997, th)  # 0xBFC90FDA
    r = tl.fma(j, -7.549789415861596e-08, r)  # 0xB3A22168
    r = tl.fma(j, -5.390302953474238e-15, r)  # 0xA7C234C5
    z = r * r
    # sin r: 0xB94D4153, 0x3C0885E4, 0xBE2AAAA8
    p_sin = tl.fma(tl.fma(-1.9574658654164523e-04, z, 8.33270326256752e-03), z, -0.16666662693023682)
    sin_r = tl.fma(p_sin, tl.fma(z, r, 0.0), r)
    # cos r: 0x37CBAC00, 0xBAB607ED, 0x3D2AAABB, 0xBEFFFFFF
    p_cos = tl.fma(tl.fma(2.4279579520225525e-05, z, -1.3887860113754869e-03), z, 4.1666727513074875e-02)
    cos_r = tl.fma(tl.fma(p_cos, z, -0.4999999701976776), z, 1.0)
    res = tl.where((q & 1) != 0, sin_r, cos_r)  # cos(r + qπ/2): cos r, -sin r, -cos r, sin r
    return tl.where(((q + 1) & 2) != 0, 0.0 - res, res)


@triton.jit
def _randn(seed, offset):
    """``tl.randn(seed, offset)`` bit for bit on the GPU (Triton 3.8.0: the same Philox words, uniforms,
    log, sqrt and Box-Muller, and libdevice's cosine through ``_cosf_fast_path``), without the local
    memory of cosf's slow path. ``fastcps.ops.philox.philox_randn`` reproduces it as it reproduced
    ``tl.randn``: exact words, ulp-level log/cos."""
    i1, i2, _, _ = tl.randint4x(seed, offset)
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
    u2 = tl.uint_to_uniform_float(i2)
    th = 6.283185307179586 * u2
    r = tl.math.sqrt(-2.0 * tl.math.log(u1))
    return r * _cosf_fast_path(th)


@triton.jit
def _cps_step_kernel(
    x_ptr,
    v_ptr,
    noise_ptr,
    prev_in_ptr,
    prev_out_ptr,
    mean_ptr,
    alpha_ptr,
    beta_ptr,
    std_ptr,
    part_ptr,
    N,
    stride_x,
    stride_v,
    stride_noise,
    stride_prev,
    seed,
    offset,
    n_chunks,
    MODE: tl.constexpr,
    WRITE_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    x_row = x_ptr + row * stride_x
    v_row = v_ptr + row * stride_v
    if MODE == 0:
        noise_row = noise_ptr + row * stride_noise
    if MODE == 1:
        # int64 counter: offset + b·N + n, independent of the tiling.
        ctr_row = offset + row * N
    if MODE == 2:
        prev_in_row = prev_in_ptr + row * stride_prev
    else:
        std = tl.load(std_ptr + row)
        prev_out_row = prev_out_ptr + row * N
    if WRITE_MEAN:
        mean_row = mean_ptr + row * N

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cols0 = tl.arange(0, BLOCK)
    start = chunk * (BLOCK * ITERS)
    for i in range(ITERS):
        cols = start + i * BLOCK + cols0
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_row + cols, mask=mask, other=0.0).to(tl.float32)
        mu = alpha * x + beta * v
        if MODE == 2:
            prev = tl.load(prev_in_row + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            if MODE == 0:
                eps = tl.load(noise_row + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                eps = _randn(seed, ctr_row + cols)
            prev_q = (mu + std * eps).to(prev_out_ptr.dtype.element_ty)
            tl.store(prev_out_row + cols, prev_q, mask=mask)
            # log-prob of the value as stored (after rounding to x.dtype), not of the fp32 one
            prev = prev_q.to(tl.float32)
        if WRITE_MEAN:
            tl.store(mean_row + cols, mu.to(mean_ptr.dtype.element_ty), mask=mask)
        d = prev - mu
        acc += tl.where(mask, d * d, 0.0)
    tl.store(part_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0))


def cps_step_fwd(
    x,
    v,
    alpha,
    beta,
    std,
    lp_w,
    lp_c,
    *,
    noise=None,
    seed=None,
    offset=0,
    prev_sample=None,
    return_mean=False,
    block=None,
    num_warps=None,
    iters=None,
):
    """Rollout step. mu = alpha*x + beta*v.

    Exactly one of: noise (B,N) given -> prev = mu + std*noise;
                    seed (python int) -> noise[b, n] = tl.randn(seed, offset + b*N + n) (int64
                                         counter), so same seed => same prev regardless of BLOCK/grid;
                    prev_sample (B,N) given -> no prev written, only its log-prob.
    logp[b] = lp_c[b] - lp_w[b] * mean_n((prev - mu)^2), computed in fp32 from the prev value as it is
    STORED (i.e. after rounding prev to x.dtype), so it equals the log-prob of the tensor returned.
    Returns StepOut(prev or None, logp fp32 (B,), mean or None), a NamedTuple; prev and mean are new
    contiguous (B,N) tensors of x.dtype. ``block``/``num_warps``/``iters`` override the launch heuristics
    (testing).
    """
    given = (noise is not None) + (seed is not None) + (prev_sample is not None)
    if given != 1:
        raise ValueError("cps_step_fwd needs exactly one of noise=, seed= or prev_sample=")
    B, N = x.shape
    if N > _N_LIMIT:
        raise ValueError(f"rows of {N} elements exceed the kernel's int32 in-row offsets ({_N_LIMIT})")
    if seed is not None:
        if not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must be a Python int in int64 range, got {seed!r}")
        if not isinstance(offset, int) or offset < 0 or offset + B * N > 2**63 - 1:
            raise ValueError(f"offset must be a non-negative int with offset + B*N < 2**63, got {offset!r}")
    mode = MODE_NOISE if noise is not None else MODE_SEED if seed is not None else MODE_PREV

    out = None if mode == MODE_PREV else torch.empty((B, N), dtype=x.dtype, device=x.device)
    mean = torch.empty((B, N), dtype=x.dtype, device=x.device) if return_mean else None
    if B == 0 or N == 0:
        # nothing to launch; mean over an empty row is NaN, as torch's .mean() would say
        d2 = torch.full((B,), float("nan"), dtype=torch.float32, device=x.device)
        return StepOut(out, lp_c - lp_w * d2, mean)

    tensors = [t for t in (x, v, noise, prev_sample) if t is not None]
    cfg = launch_config(
        B, N, [t.element_size() for t in tensors], block=block, num_warps=num_warps, iters=iters
    )
    part = torch.empty((B, cfg.chunks), dtype=torch.float32, device=x.device)
    _cps_step_kernel[(B, cfg.chunks)](
        x,
        v,
        noise,
        prev_sample,
        out,
        mean,
        alpha,
        beta,
        std,
        part,
        N,
        x.stride(0),
        v.stride(0),
        noise.stride(0) if noise is not None else 0,
        prev_sample.stride(0) if prev_sample is not None else 0,
        seed if seed is not None else 0,
        offset,
        cfg.chunks,
        MODE=mode,
        WRITE_MEAN=return_mean,
        BLOCK=cfg.block,
        ITERS=cfg.iters,
        num_warps=cfg.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    logp = lp_c - lp_w * (part.sum(1) / N)
    return StepOut(out, logp, mean)


def compile_variants(batch: int = 1):
    """(name, kernel, signature, constexprs, num_warps) for every variant ``bench/ptx_report.py``
    compiles: each uniform latent dtype × each mode (noise / seed / prev, with and without mean),
    at the heuristic tiling of a (batch, 4096·64) latent."""
    out = []
    for tname, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg = launch_config(batch, 4096 * 64, [torch_dtype.itemsize])
        for mode, mname in ((MODE_NOISE, "noise"), (MODE_SEED, "seed"), (MODE_PREV, "prev")):
            for write_mean in (False, True):
                lat = f"*{tname}"
                sig = {
                    "x_ptr": lat,
                    "v_ptr": lat,
                    "noise_ptr": lat if mode == MODE_NOISE else "constexpr",
                    "prev_in_ptr": lat if mode == MODE_PREV else "constexpr",
                    "prev_out_ptr": lat if mode != MODE_PREV else "constexpr",
                    "mean_ptr": lat if write_mean else "constexpr",
                    "alpha_ptr": "*fp32",
                    "beta_ptr": "*fp32",
                    "std_ptr": "*fp32",
                    "part_ptr": "*fp32",
                    "N": "i32",
                    "stride_x": "i32",
                    "stride_v": "i32",
                    "stride_noise": "i32",
                    "stride_prev": "i32",
                    "seed": "i64",
                    "offset": "i64",
                    "n_chunks": "i32",
                    "MODE": "constexpr",
                    "WRITE_MEAN": "constexpr",
                    "BLOCK": "constexpr",
                    "ITERS": "constexpr",
                }
                consts = {"MODE": mode, "WRITE_MEAN": write_mean, "BLOCK": cfg.block, "ITERS": cfg.iters}
                for k, t in sig.items():
                    if t == "constexpr" and k not in consts:
                        consts[k] = None
                name = f"cps_step[{tname},{mname}{',mean' if write_mean else ''}]@B={batch}"
                out.append((name, _cps_step_kernel, sig, consts, cfg.num_warps))
    return out
