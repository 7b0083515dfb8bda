"""The Triton kernels compiled for a real GPU, at FLUX sizes, vs the fp32 reference. Marked `gpu`:
skipped with the reason on CPU-only machines (the CPU suite covers the same kernels through
TRITON_INTERPRET=1, which a CUDA run must not have set)."""

import os

import pytest
import torch

from fastcps import cps_logprob_kl, cps_logprob_kl_ref, cps_step, cps_step_ref, step_coeffs
from tolerance import assert_close_fp32, assert_close_lowp

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def on_gpu(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(
            "TRITON_INTERPRET=1 is set: run the gpu tests with TRITON_INTERPRET=0 to compile for the device"
        )
    monkeypatch.setenv("FASTCPS_IMPL", "triton")


@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_step_and_logprob_kl_at_flux_sizes(b, dtype):
    g = torch.Generator(device="cuda").manual_seed(b)
    x, v, eps, vref = (torch.randn(b, 4096, 64, device="cuda", generator=g).to(dtype) for _ in range(4))
    sig = torch.linspace(0.9, 0.3, b, device="cuda")
    c = step_coeffs("cps", sig, sig * 0.8)
    out = cps_step(x, v, c, noise=eps, return_mean=True)
    ref = cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=eps)
    own = cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, prev_sample=out.prev_sample)
    assert_close_fp32("log_prob of returned x'", out.log_prob, own.log_prob, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        assert_close_fp32("prev_sample", out.prev_sample, ref.prev_sample)
    else:
        naive = (
            c.alpha.to(dtype).view(-1, 1, 1) * x
            + c.beta.to(dtype).view(-1, 1, 1) * v
            + c.s.to(dtype).view(-1, 1, 1) * eps
        )
        exact = (
            c.alpha.view(-1, 1, 1) * x.float()
            + c.beta.view(-1, 1, 1) * v.float()
            + c.s.view(-1, 1, 1) * eps.float()
        )
        assert_close_lowp("prev_sample", out.prev_sample, exact, naive, dtype)
    vg = v.clone().requires_grad_(True)
    lp, kl = cps_logprob_kl(x, vg, out.prev_sample, c, vref)
    (lp.sum() + kl.sum()).backward()
    vr = v.float().requires_grad_(True)
    rlp, rkl = cps_logprob_kl_ref(x, vr, out.prev_sample, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=vref)
    (rlp.sum() + rkl.sum()).backward()
    assert_close_fp32("log_prob", lp, rlp, rtol=1e-5, atol=1e-6)
    assert_close_fp32("kl", kl, rkl, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert_close_fp32("dv", vg.grad, vr.grad, rtol=tol, atol=1e-9)


def test_seeded_noise_matches_the_cpu_philox():
    x = torch.zeros(2, 4096, device="cuda")
    c = step_coeffs("cps", torch.full((2,), 0.9, device="cuda"), torch.full((2,), 0.5, device="cuda"), 1.0)
    gpu = cps_step(x, x, c, seed=3, offset=11).prev_sample.cpu()
    from fastcps.ops.philox import philox_randn

    cpu = 0.5 * philox_randn(3, 11 + torch.arange(2 * 4096)).reshape(2, 4096)
    torch.testing.assert_close(gpu, cpu, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block, iters, warps", [(128, 1, 1), (256, 4, 2), (1024, 8, 4), (2048, 2, 8)])
def test_every_tiling_agrees_on_cuda(dtype, block, iters, warps):
    """The launchers' block/iters/num_warps overrides on the device: the multi-iteration chunk loop
    (ITERS > 1), an odd N whose last chunk is partial, and rows with a stride other than N (a slice of
    a wider tensor), against the fp32 reference."""
    from fastcps.kernels.cps_logprob_kl import cps_logprob_kl_bwd, cps_logprob_kl_fwd
    from fastcps.kernels.cps_step import cps_step_fwd

    b, n = 3, 4096 * 16 + 17
    g = torch.Generator(device="cuda").manual_seed(block + iters)
    wide = [torch.randn(b, n + 40, device="cuda", generator=g).to(dtype) for _ in range(4)]
    x, v, eps, vref = (t[:, 5 : 5 + n] for t in wide)  # row stride n + 40
    assert x.stride(0) != n
    c = step_coeffs(
        "flow_sde",
        torch.tensor([0.9, 0.5, 0.2], device="cuda"),
        torch.tensor([0.7, 0.3, 0.0], device="cuda"),
        sigma_max=0.95,
    )
    tile = dict(block=block, iters=iters, num_warps=warps)
    prev, logp, _ = cps_step_fwd(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=eps, **tile)
    own = cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, prev_sample=prev)
    assert_close_fp32("log_prob", logp, own.log_prob, rtol=1e-5, atol=1e-6)
    lp, kl = cps_logprob_kl_fwd(x, v, prev, vref, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, **tile)
    vr = v.float().requires_grad_(True)
    rlp, rkl = cps_logprob_kl_ref(x, vr, prev, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=vref)
    assert_close_fp32("log_prob (training)", lp, rlp, rtol=1e-5, atol=1e-6)
    assert_close_fp32("kl", kl, rkl, rtol=1e-5, atol=1e-6)
    g_lp, g_kl = torch.randn(b, device="cuda", generator=g), torch.randn(b, device="cuda", generator=g)
    (rlp * g_lp + rkl * g_kl).sum().backward()
    dv = cps_logprob_kl_bwd(x, v, prev, vref, c.alpha, c.beta, c.lp_w, c.kl_w, g_lp, g_kl, **tile)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert_close_fp32("dv", dv.float(), vr.grad, rtol=tol, atol=1e-7)
