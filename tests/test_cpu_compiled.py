"""The production CPU path: the reference math under torch.compile (inductor's C++ backend).
The broad suites run its eager twin; here the compiled kernels themselves are checked."""

import pytest
import torch

from fastcps import cps_logprob_kl, cps_logprob_kl_ref, cps_step, cps_step_ref, step_coeffs
from tolerance import assert_close_fp32


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.setenv("FASTCPS_IMPL", "torch")
    monkeypatch.setenv("FASTCPS_COMPILE", "1")
    monkeypatch.setenv("FASTCPS_COMPILE_MIN_NUMEL", "0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_step_and_logprob_kl(dtype):
    g = torch.Generator().manual_seed(0)
    x, v, eps, vref = (torch.randn(3, 17, 64, generator=g).to(dtype) for _ in range(4))
    c = step_coeffs("cps", torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.3, 0.0]))
    out = cps_step(x, v, c, noise=eps, return_mean=True)
    ref = cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=eps)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert_close_fp32("prev_sample", out.prev_sample, ref.prev_sample, rtol=tol)
    assert_close_fp32("log_prob", out.log_prob, ref.log_prob, rtol=1e-5, atol=1e-6)

    vg = v.clone().requires_grad_(True)
    lp, kl = cps_logprob_kl(x, vg, out.prev_sample, c, vref)
    (lp.sum() + 0.5 * kl.sum()).backward()
    vr = v.float().requires_grad_(True)
    rlp, rkl = cps_logprob_kl_ref(x, vr, out.prev_sample, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=vref)
    (rlp.sum() + 0.5 * rkl.sum()).backward()
    assert_close_fp32("log_prob", lp, rlp, atol=1e-7)
    assert_close_fp32("kl", kl, rkl, atol=1e-7)
    assert vg.grad.dtype == dtype
    assert_close_fp32("dv", vg.grad, vr.grad, rtol=tol)
