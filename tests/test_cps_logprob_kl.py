"""The training op: fused log-prob/KL forward and ∂v backward against the float64 oracle (tests/oracle.py),
through the Triton interpreter and the eager CPU path. The compiled CPU path is in test_cpu_compiled.py."""

import zlib

import pytest
import torch

from fastcps import cps_logprob_kl, cps_logprob_kl_ref, step_coeffs
from oracle import assert_logprob_kl_close

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (2, 3), (3, 1009), (1, 7, 64), (4, 2, 5, 7)]
CASES = ["mid", "last", "gaussian", "no_ref"]


def stable_seed(*key) -> int:
    """A per-case seed that is the same in every run (``hash()`` of a str changes with PYTHONHASHSEED)."""
    return zlib.crc32(repr(key).encode())


def make(shape, dtype, sampler="cps", last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x, v, prev, vref = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    sigma = 0.15 + 0.8 * torch.rand(b, generator=g)  # ≤ 0.95: Flow-SDE needs no sigma_max
    nxt = torch.zeros(b) if last else sigma * (0.3 + 0.6 * torch.rand(b, generator=g))
    return x, v, prev, vref, step_coeffs(sampler, sigma, nxt)


def make_case(shape, dtype, case, seed):
    """mid: a cps step; last: σ' = 0; gaussian: Flow-SDE's weights; no_ref: without v_ref (KL = 0).
    Also returns the output gradients (g_logp, g_kl) the backward is driven with."""
    x, v, prev, vref, c = make(
        shape, dtype, sampler="flow_sde" if case == "gaussian" else "cps", last=case == "last", seed=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    g_lp, g_kl = torch.randn(shape[0], generator=g), torch.randn(shape[0], generator=g)
    return x, v, prev, None if case == "no_ref" else vref, c, g_lp, g_kl


def ref_args(c):
    return c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w


def grads(fn, v, g_lp, g_kl):
    v = v.detach().clone().requires_grad_(True)
    logp, kl = fn(v)
    (logp * g_lp + kl * g_kl).sum().backward()
    return logp.detach(), kl.detach(), v.grad


def fused(x, prev, c, vref):
    return lambda vv: cps_logprob_kl(x, vv, prev, c, vref)


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_triton_forward_backward_match_float64_oracle(impl, dtype, shape, case):
    """The Triton forward and backward kernels (interpreter), every dtype and shape."""
    x, v, prev, vref, c, g_lp, g_kl = make_case(shape, dtype, case, stable_seed(shape, dtype, case))
    got = grads(fused(x, prev, c, vref), v, g_lp, g_kl)
    assert_logprob_kl_close(got, x, v, prev, vref, c, g_lp, g_kl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_reference_and_eager_cpu_path_match_float64_oracle(monkeypatch, dtype, case):
    """``cps_logprob_kl_ref`` (the fp32 oracle of the benchmarks and GPU tests, ∂v by autograd) and the CPU
    operator with FASTCPS_COMPILE=0: ``_fwd_math`` and the closed-form ``_bwd_math``, run eagerly."""
    monkeypatch.setenv("FASTCPS_IMPL", "torch")
    for shape in SHAPES:
        x, v, prev, vref, c, g_lp, g_kl = make_case(
            shape, dtype, case, stable_seed(shape, dtype, case, "eager")
        )
        ref = grads(lambda vv: cps_logprob_kl_ref(x, vv, prev, *ref_args(c), v_ref=vref), v, g_lp, g_kl)
        assert_logprob_kl_close(ref, x, v, prev, vref, c, g_lp, g_kl, where=f" (cps_logprob_kl_ref {shape})")
        got = grads(fused(x, prev, c, vref), v, g_lp, g_kl)
        assert_logprob_kl_close(got, x, v, prev, vref, c, g_lp, g_kl, where=f" (eager operator {shape})")


TILINGS = [(32, 1, 1), (32, 4, 1), (64, 2, 2), (16, 8, 1), (512, 1, 4)]  # (block, iters, num_warps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block, iters, warps", TILINGS)
@pytest.mark.parametrize("with_ref", [True, False], ids=["v_ref", "no_ref"])
def test_training_kernels_agree_for_every_tiling(dtype, block, iters, warps, with_ref):
    """The forward and backward launchers' block/iters/num_warps overrides through the interpreter
    (tests/test_gpu.py does the same on a device): ITERS > 1, N = 333 with a partial last chunk (with
    (32, 4): 77 elements, one block fully masked), rows with a stride other than N (slices of a wider
    tensor). ∂v is elementwise, so it must equal the default tiling's bit for bit."""
    from fastcps.kernels.cps_logprob_kl import cps_logprob_kl_bwd, cps_logprob_kl_fwd

    b, n = 3, 333
    x, v, prev, vref, c, g_lp, g_kl = make_case((b, n + 40), dtype, "gaussian", seed=block * iters)
    x, v, prev, vref = (t[:, 5 : 5 + n] for t in (x, v, prev, vref))  # row stride n + 40
    assert x.stride(0) == n + 40
    vref = vref if with_ref else None
    kl_w, g_kl_in = (c.kl_w, g_kl) if with_ref else (None, None)
    tile = dict(block=block, iters=iters, num_warps=warps)
    lp, kl = cps_logprob_kl_fwd(x, v, prev, vref, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, **tile)
    dv = cps_logprob_kl_bwd(x, v, prev, vref, c.alpha, c.beta, c.lp_w, kl_w, g_lp, g_kl_in, **tile)
    assert_logprob_kl_close((lp, kl, dv), x, v, prev, vref, c, g_lp, g_kl)
    default = cps_logprob_kl_bwd(x, v, prev, vref, c.alpha, c.beta, c.lp_w, kl_w, g_lp, g_kl_in)
    assert torch.equal(dv, default)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_backward_with_only_one_output_used(impl):
    """Autograd hands the op None for the gradient of an output the loss does not use: zeros."""
    x, v, prev, vref, c = make((3, 50), torch.float32, seed=4)
    ones, zeros = torch.ones(3), torch.zeros(3)
    for name, g_lp, g_kl in (("log_prob", ones, zeros), ("kl", zeros, ones)):
        vg = v.clone().requires_grad_(True)
        out = cps_logprob_kl(x, vg, prev, c, vref)
        getattr(out, name).sum().backward()
        got = (out.log_prob.detach(), out.kl.detach(), vg.grad)
        assert_logprob_kl_close(got, x, v, prev, vref, c, g_lp, g_kl, where=f" ({name} only)")


def test_reference_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    x, v, prev, vref = (torch.randn(3, 2, 5, generator=g, dtype=torch.float64) for _ in range(4))
    c = step_coeffs("flow_sde", torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.2, 0.0]), 0.7)
    coeffs = [t.double() for t in ref_args(c)]
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda vv: cps_logprob_kl_ref(x, vv, prev, *coeffs, v_ref=vref), (v,))
    # and the closed-form ∂v of docs/math.md is what autograd finds
    lp, kl = cps_logprob_kl_ref(x, v, prev, *coeffs, v_ref=vref)
    (lp.sum() + kl.sum()).backward()
    alpha, beta, lp_w, _, kl_w = coeffs
    n = 10
    d = prev - (alpha.view(-1, 1, 1) * x + beta.view(-1, 1, 1) * v.detach())
    want = (2 * lp_w * beta / n).view(-1, 1, 1) * d + (2 * kl_w * beta**2 / n).view(-1, 1, 1) * (
        v.detach() - vref
    )
    torch.testing.assert_close(v.grad, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_non_contiguous_and_mixed_dtypes(impl):
    """Transposed latents, and the training layout: model output in bf16, stored latents in fp32."""
    g = torch.Generator().manual_seed(2)
    x, v, prev, vref = (torch.randn(2, 64, 9, generator=g).transpose(1, 2) for _ in range(4))
    c = make((2, 3), torch.float32)[-1]
    v16 = v.to(torch.bfloat16)
    g_lp, g_kl = torch.tensor([1.0, -0.5]), torch.tensor([0.7, 2.0])
    got = grads(fused(x, prev, c, vref), v16, g_lp, g_kl)
    assert_logprob_kl_close(got, x, v16, prev, vref, c, g_lp, g_kl)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_bad_inputs_name_the_argument(impl):
    x, v, prev, vref, c = make((2, 8), torch.float32)
    with pytest.raises(ValueError, match="'prev_sample' has shape"):
        cps_logprob_kl(x, v, prev[:, :4], c)
    with pytest.raises(ValueError, match="'ref_model_output' has shape"):
        cps_logprob_kl(x, v, prev, c, vref[:1])
    with pytest.raises(TypeError, match="'sample' has dtype torch.int32"):
        cps_logprob_kl(x.int(), v, prev, c)
    with pytest.raises(ValueError, match="'model_output' is on meta"):
        cps_logprob_kl(x, torch.empty(2, 8, device="meta"), prev, c)
    for name in ("alpha", "beta", "lp_w", "lp_c", "kl_w"):
        bad = c._replace(**{name: torch.ones(3)})
        with pytest.raises(
            ValueError, match=rf"^coefficient '{name}' must have shape \(2,\) \(one per sample\), got \(3,\)$"
        ):
            cps_logprob_kl(x, v, prev, bad, vref)
