"""The training op: fused log-prob/KL forward and ∂v backward vs the fp32 reference."""

import zlib

import pytest
import torch

from fastcps import cps_logprob_kl, cps_logprob_kl_ref, step_coeffs
from tolerance import assert_close_fp32, assert_close_lowp

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (2, 3), (3, 1009), (1, 7, 64), (4, 2, 5, 7)]


def stable_seed(*key) -> int:
    """A per-case seed that is the same in every run (``hash()`` of a str changes with PYTHONHASHSEED)."""
    return zlib.crc32(repr(key).encode())


def make(shape, dtype, sampler="cps", last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x, v, prev, vref = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    sigma = 0.15 + 0.8 * torch.rand(b, generator=g)
    nxt = torch.zeros(b) if last else sigma * (0.3 + 0.6 * torch.rand(b, generator=g))
    return x, v, prev, vref, step_coeffs(sampler, sigma, nxt)


def ref_args(c):
    return c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w


def naive(x, v, prev, vref, c, dtype):
    """Op-by-op PyTorch in ``dtype`` (the anchors' math) with autograd: the same-precision baseline."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    col = lambda t: t.to(dtype).view(shape)  # noqa: E731
    dims = tuple(range(1, x.ndim))
    v = v.detach().to(dtype).requires_grad_(True)
    mean = col(c.alpha) * x.to(dtype) + col(c.beta) * v
    logp = c.lp_c.to(dtype) - c.lp_w.to(dtype) * ((prev.to(dtype) - mean) ** 2).mean(dims)
    kl = c.kl_w.to(dtype) * c.beta.to(dtype) ** 2 * ((v - vref.to(dtype)) ** 2).mean(dims)
    return logp, kl, v


def grads(fn, v, g_lp, g_kl):
    v = v.detach().clone().requires_grad_(True)
    logp, kl = fn(v)
    (logp * g_lp + kl * g_kl).sum().backward()
    return logp.detach(), kl.detach(), v.grad


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", ["mid", "last", "gaussian", "no_ref"])
def test_forward_backward_match_reference(impl, dtype, shape, case):
    x, v, prev, vref, c = make(shape, dtype, sampler="flow_sde" if case == "gaussian" else "cps",
                               last=case == "last", seed=stable_seed(shape, dtype, case))
    if case == "gaussian":  # Flow-SDE needs σ < 1 without sigma_max; make() keeps σ ≤ 0.95
        pass
    use_ref = None if case == "no_ref" else vref
    g = torch.Generator().manual_seed(1)
    g_lp, g_kl = torch.randn(shape[0], generator=g), torch.randn(shape[0], generator=g)

    fused_lp, fused_kl, fused_dv = grads(lambda vv: cps_logprob_kl(x, vv, prev, c, use_ref), v, g_lp, g_kl)
    ref_lp, ref_kl, ref_dv = grads(
        lambda vv: cps_logprob_kl_ref(x, vv, prev, *ref_args(c), v_ref=use_ref), v.float(), g_lp, g_kl)
    assert fused_dv.dtype == dtype and fused_dv.shape == v.shape
    if use_ref is None:
        assert torch.equal(fused_kl, torch.zeros_like(fused_kl))
    if dtype == torch.float32:
        assert_close_fp32("log_prob", fused_lp, ref_lp, atol=1e-7)
        assert_close_fp32("kl", fused_kl, ref_kl, atol=1e-7)
        assert_close_fp32("dv", fused_dv, ref_dv, atol=1e-9)
    else:
        pt_lp, pt_kl, pt_v = naive(x, v, prev, vref if use_ref is not None else v, c, dtype)
        (pt_lp.float() * g_lp + pt_kl.float() * g_kl).sum().backward()
        assert_close_lowp("log_prob", fused_lp, ref_lp, pt_lp, torch.float32)
        assert_close_lowp("kl", fused_kl, ref_kl, pt_kl, torch.float32)
        assert_close_lowp("dv", fused_dv, ref_dv, pt_v.grad, dtype, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_backward_with_only_one_output_used(impl):
    x, v, prev, vref, c = make((3, 50), torch.float32, seed=4)
    v = v.requires_grad_(True)
    cps_logprob_kl(x, v, prev, c, vref).log_prob.sum().backward()
    ref_v = v.detach().clone().requires_grad_(True)
    cps_logprob_kl_ref(x, ref_v, prev, *ref_args(c), v_ref=vref).log_prob.sum().backward()
    assert_close_fp32("dv (logp only)", v.grad, ref_v.grad)
    v.grad = None
    cps_logprob_kl(x, v, prev, c, vref).kl.sum().backward()
    ref_v.grad = None
    cps_logprob_kl_ref(x, ref_v, prev, *ref_args(c), v_ref=vref).kl.sum().backward()
    assert_close_fp32("dv (kl only)", v.grad, ref_v.grad)


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
    want = (2 * lp_w * beta / n).view(-1, 1, 1) * d + (2 * kl_w * beta ** 2 / n).view(-1, 1, 1) * (v.detach() - vref)
    torch.testing.assert_close(v.grad, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_non_contiguous_and_mixed_dtypes(impl):
    g = torch.Generator().manual_seed(2)
    x, v, prev, vref = (torch.randn(2, 64, 9, generator=g).transpose(1, 2) for _ in range(4))
    c = make((2, 3), torch.float32)[-1]
    v16 = v.to(torch.bfloat16)  # model output in bf16, stored latents in fp32, as in training
    lp, kl, dv = grads(lambda vv: cps_logprob_kl(x, vv, prev, c, vref), v16, torch.ones(2), torch.ones(2))
    rlp, rkl, rdv = grads(lambda vv: cps_logprob_kl_ref(x, vv, prev, *ref_args(c), v_ref=vref),
                          v16.float(), torch.ones(2), torch.ones(2))
    assert_close_fp32("log_prob", lp, rlp, atol=1e-6)
    assert_close_fp32("kl", kl, rkl, atol=1e-6)
    assert dv.dtype == torch.bfloat16
    torch.testing.assert_close(dv.float(), rdv, atol=1e-6, rtol=2 ** -7)


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
