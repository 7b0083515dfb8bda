"""The fused ops as real PyTorch operators (``torch.ops.fastcps.*``): opcheck on both CPU paths,
whole-graph torch.compile of the public functions, fake CUDA tensors, and the CUDA dispatch."""

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fastcps.kernels.cps_logprob_kl
import fastcps.kernels.cps_step
from fastcps import (
    cps_logprob_kl,
    cps_logprob_kl_ref,
    cps_step,
    cps_step_ref,
    sde_step_with_logprob,
    step_coeffs,
)
from fastcps.ops.dispatch import choose_impl
from tolerance import assert_close_fp32

IMPLS = ["torch", "triton"]
# Each Triton launcher and the kernel module the ops import it from (fastcps.kernels is a namespace package).
LAUNCHER_MODULES = {
    "cps_step_fwd": fastcps.kernels.cps_step,
    "cps_logprob_kl_fwd": fastcps.kernels.cps_logprob_kl,
    "cps_logprob_kl_bwd": fastcps.kernels.cps_logprob_kl,
}
OPS = ("cps_step", "cps_logprob_kl", "cps_logprob_kl_backward")


def coeffs(b, device="cpu"):
    sig = torch.linspace(0.9, 0.3, b, device=device)
    return step_coeffs("cps", sig, sig * 0.6)


def latents(shape, dtype, n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(n)]


def step_args(mode, return_mean, dtype, shape, device="cpu"):
    """Arguments of ``fastcps::cps_step`` for one mode; v requires grad so opcheck checks autograd."""
    x, v, e = latents(shape, dtype, 3, device)
    c = coeffs(shape[0], device)
    return (
        x,
        v.requires_grad_(True),
        c.alpha,
        c.beta,
        c.s,
        c.lp_w,
        c.lp_c,
        e if mode == "noise" else None,
        e if mode == "prev" else None,
        1234 if mode == "seed" else None,
        7,
        return_mean,
    )


def logprob_kl_args(with_ref, dtype, shape, device="cpu"):
    x, v, prev, vref = latents(shape, dtype, 4, device)
    c = coeffs(shape[0], device)
    return (
        x,
        v.requires_grad_(True),
        prev,
        vref if with_ref else None,
        c.alpha,
        c.beta,
        c.lp_w,
        c.lp_c,
        c.kl_w,
    )


def backward_args(with_ref, dtype, shape, device="cpu"):
    x, v, prev, vref = latents(shape, dtype, 4, device)
    c = coeffs(shape[0], device)
    g_logp, g_kl = latents(shape[:1], torch.float32, 2, device, seed=1)
    return (
        x,
        v,
        prev,
        vref if with_ref else None,
        c.alpha,
        c.beta,
        c.lp_w,
        c.kl_w if with_ref else None,
        g_logp,
        g_kl if with_ref else None,
    )


# Every mode, return_mean on and off, fp32 and bf16, batch 1, odd N.
STEP_CASES = [
    ("noise", True, torch.float32, (3, 37)),
    ("noise", False, torch.bfloat16, (1, 64)),
    ("seed", True, torch.bfloat16, (2, 33)),
    ("seed", False, torch.float32, (1, 37)),
    ("prev", True, torch.bfloat16, (3, 37)),
    ("prev", False, torch.float32, (1, 33)),
]
KL_CASES = [
    (True, torch.float32, (3, 37)),
    (False, torch.bfloat16, (1, 33)),
    (True, torch.bfloat16, (1, 64)),
    (False, torch.float32, (2, 37)),
]


def assert_opcheck(op, args):
    result = torch.library.opcheck(getattr(torch.ops.fastcps, op).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
def test_opcheck_cps_step(impl, case):
    """Schema, fake kernel (symbolic shapes), autograd and aot dispatch of the rollout op, each mode."""
    assert_opcheck("cps_step", step_args(*case))


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("case", KL_CASES, ids=str)
def test_opcheck_cps_logprob_kl(impl, case):
    """The same for the training op, with and without v_ref; its autograd runs the backward op."""
    assert_opcheck("cps_logprob_kl", logprob_kl_args(*case))


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("case", KL_CASES[:2], ids=str)
def test_opcheck_cps_logprob_kl_backward(impl, case):
    """The training op's backward is an operator too, so compiled backward graphs trace it."""
    assert_opcheck("cps_logprob_kl_backward", backward_args(*case))


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("mode", ["noise", "prev"])
def test_cps_step_gradient_is_the_references(impl, mode):
    """The rollout op's autograd formula (∂v through x', log-prob and μ) agrees with autograd on the
    oracle."""
    x, v, e = latents((2, 5, 7), torch.float32, 3)
    w_prev, w_mean = latents((2, 5, 7), torch.float32, 2, seed=1)
    w_logp = torch.tensor([0.7, -1.3])
    c = coeffs(2)
    source = {"noise": e} if mode == "noise" else {"prev_sample": e}

    def loss(out):
        prev_term = (out.prev_sample * w_prev).sum() if mode == "noise" else 0.0
        return prev_term + (out.log_prob * w_logp).sum() + (out.mean * w_mean).sum()

    vg, vr = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    loss(cps_step(x, vg, c, return_mean=True, **source)).backward()
    loss(cps_step_ref(x, vr, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, **source)).backward()
    assert_close_fp32("dv", vg.grad, vr.grad, atol=1e-7)


@pytest.mark.traces
@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_sde_step_with_logprob_compiles_to_one_graph(impl):
    """Rollout (noise=, seed=) and training (prev_sample=, with backward) trace with fullgraph=True
    (any graph break raises) and give eager's numbers."""
    x, v, eps = latents((2, 4, 9), torch.float32, 3)
    sig, nxt = torch.tensor([0.8, 0.7]), torch.tensor([0.6, 0.5])

    def rollout(v, x, eps, seed):
        return sde_step_with_logprob(v, x, 0.8, 0.6, noise=eps), sde_step_with_logprob(
            v, x, sig, nxt, seed=seed
        )

    def train(v, x, prev, sig, nxt):
        return sde_step_with_logprob(v, x, sig, nxt, prev_sample=prev).log_prob

    compiled = torch.compile(rollout, fullgraph=True, backend="aot_eager")
    for seed in (3, 4):  # a new seed reuses the graph (seed is a SymInt in the op's schema)
        for got, want in zip(compiled(v, x, eps, seed), rollout(v, x, eps, seed)):
            for name, a, b in zip(got._fields, got, want):
                torch.testing.assert_close(a, b, msg=name)
    vg, vr = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    lp = torch.compile(train, fullgraph=True, backend="aot_eager")(vg, x, eps, sig, nxt)
    lp.sum().backward()
    train(vr, x, eps, sig, nxt).sum().backward()
    torch.testing.assert_close(lp, train(v, x, eps, sig, nxt))
    torch.testing.assert_close(vg.grad, vr.grad)


@pytest.mark.traces
@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_cps_logprob_kl_compiles_to_one_graph(impl):
    """The training op with v_ref, forward and backward, in one compiled graph each, vs the oracle."""
    x, v, prev, vref = latents((3, 2, 11), torch.bfloat16, 4)
    c = coeffs(3)

    def loss(vv):
        lp, kl = cps_logprob_kl(x, vv, prev, c, vref)
        return (lp - 0.5 * kl).sum()

    vg = v.clone().requires_grad_(True)
    torch.compile(loss, fullgraph=True, backend="aot_eager")(vg).backward()
    vr = v.float().requires_grad_(True)
    lp, kl = cps_logprob_kl_ref(x, vr, prev, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=vref)
    (lp - 0.5 * kl).sum().backward()
    torch.testing.assert_close(vg.grad.float(), vr.grad, atol=1e-6, rtol=2**-7)


@pytest.mark.traces
def test_training_step_under_inductor(monkeypatch):
    """One inductor compile (forward and backward graphs, the σ checks lowered as asserts)."""
    monkeypatch.setenv("FASTCPS_IMPL", "torch")
    x, v, prev = latents((2, 3, 5), torch.float32, 3)
    sig = torch.tensor([0.8, 0.4])

    def train(v, sig):
        return sde_step_with_logprob(v, x, sig, sig * 0.5, prev_sample=prev).log_prob

    compiled = torch.compile(train, fullgraph=True)
    vg, vr = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    compiled(vg, sig).sum().backward()
    train(vr, sig).sum().backward()
    torch.testing.assert_close(vg.grad, vr.grad)
    with pytest.raises(RuntimeError, match=r"sigma must lie in \(0, 1\]"):
        compiled(v, sig + 0.5)


@pytest.mark.traces
def test_traced_sigma_checks_run_in_the_graph():
    """Traced, σ tensors cannot be read on the host: their checks become asserts that fire at run time."""
    f = torch.compile(lambda s, n: step_coeffs("cps", s, n).s, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        f(torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.2])),
        step_coeffs("cps", torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.2])).s,
    )
    with pytest.raises(RuntimeError, match="sigma_next must satisfy 0 <= sigma_next < sigma"):
        f(torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.6]))


@pytest.fixture
def nothing_launches(monkeypatch):
    """The Triton launchers and torch.compile raise if anything calls them."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel launch or a compile happened under FakeTensorMode")

    for name in ("cps_step_fwd", "cps_logprob_kl_fwd", "cps_logprob_kl_bwd"):
        monkeypatch.setattr(LAUNCHER_MODULES[name], name, launched)
    monkeypatch.setattr(torch, "compile", launched)
    monkeypatch.delenv("FASTCPS_IMPL", raising=False)
    monkeypatch.setenv("FASTCPS_COMPILE", "1")  # so that a CPU body reached by mistake would compile
    monkeypatch.setenv("FASTCPS_COMPILE_MIN_NUMEL", "0")


def assert_fake_cuda(t, shape, dtype):
    assert isinstance(t, FakeTensor) and t.device.type == "cuda", (type(t), t.device)
    assert t.shape == shape and t.dtype == dtype, (t.shape, t.dtype)


def test_ops_on_fake_cuda_tensors(nothing_launches):
    """Shape/dtype propagation on fake CUDA tensors, every mode, without a launch, a compile or a host
    read (``bool()``/``.item()`` of a fake tensor raises); a CPU tensor mixed in is refused."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, v, e, vref = (torch.empty(2, 3, 7, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        c = coeffs(2, "cuda")
        for source in ({"noise": e}, {"seed": 5}, {"prev_sample": e}):
            for return_mean in (False, True):
                out = cps_step(x, v, c, return_mean=return_mean, **source)
                assert_fake_cuda(out.prev_sample, x.shape, torch.bfloat16)
                assert_fake_cuda(out.log_prob, (2,), torch.float32)
                if return_mean:
                    assert_fake_cuda(out.mean, x.shape, torch.bfloat16)
                else:
                    assert out.mean is None
        lp, kl = cps_logprob_kl(x, v.requires_grad_(True), e, c, vref)
        assert_fake_cuda(lp, (2,), torch.float32)
        assert_fake_cuda(kl, (2,), torch.float32)
        rows = [t.reshape(2, -1) for t in (x, v.detach(), e, vref)]
        dv = torch.ops.fastcps.cps_logprob_kl_backward(*rows, c.alpha, c.beta, c.lp_w, c.kl_w, lp, kl)
        assert_fake_cuda(dv, (2, 21), torch.bfloat16)
        for kwargs in ({"seed": 3}, {"noise": e}, {"prev_sample": e}):
            out = sde_step_with_logprob(v.detach(), x, 0.7, 0.5, **kwargs)
            for t, shape in zip(out, (x.shape, (2,), x.shape, (2,))):
                assert_fake_cuda(t, shape, t.dtype)
        with pytest.raises(ValueError, match="'model_output' is on cpu but 'sample' is on cuda"):
            cps_step(x, torch.empty(2, 3, 7, dtype=torch.bfloat16), c, noise=e)
        with pytest.raises(ValueError, match="fastcps::cps_logprob_kl: 'prev' is on cpu but 'x' is on cuda"):
            torch.ops.fastcps.cps_logprob_kl(
                rows[0], rows[1], rows[2].cpu(), None, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w
            )


def test_sigma_checks_on_cuda_tensors_never_read_them(monkeypatch):
    """σ on a (fake) CUDA device: reading it would raise; each check is a device-side assert instead,
    while Python numbers are still checked on the host."""
    asserted = []
    real_assert = torch._assert_async
    monkeypatch.setattr(
        torch, "_assert_async", lambda ok, msg: (asserted.append(msg), real_assert(ok, msg))[1]
    )
    with FakeTensorMode():
        sig = torch.full((2,), 0.9, device="cuda")
        c = step_coeffs("cpws", sig, sig * 0.5, 0.3)
        assert c.s.device.type == "cuda"
        with pytest.raises(ValueError, match="eta must be >= 0 for cps, got -0.1"):
            step_coeffs("cps", sig, sig * 0.5, -0.1)
    assert [m.split(" ")[0] for m in asserted] == [
        "sigma",
        "sigma_next",
        "flow_sde",
        "cpws",
        "sigma",
        "sigma_next",
    ]


def test_cuda_tensors_dispatch_to_the_triton_launchers(monkeypatch):
    """Without a GPU: each operator has a CUDA kernel, choose_impl picks Triton for a CUDA tensor, and
    that kernel, called on fake CUDA tensors, runs the Triton launcher."""
    monkeypatch.delenv("FASTCPS_IMPL", raising=False)
    calls = []

    def recorder(name, make):
        def launcher(*args, **kwargs):
            calls.append(name)
            return make(*args, **kwargs)

        monkeypatch.setattr(LAUNCHER_MODULES[name], name, launcher)

    fp32_rows = lambda x: x.new_empty(x.shape[:1], dtype=torch.float32)  # noqa: E731
    recorder("cps_step_fwd", lambda x, *a, **k: (torch.empty_like(x), fp32_rows(x), torch.empty_like(x)))
    recorder("cps_logprob_kl_fwd", lambda x, *a: (fp32_rows(x), fp32_rows(x)))
    recorder("cps_logprob_kl_bwd", lambda x, v, *a: torch.empty_like(v))
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for op in OPS:
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"fastcps::{op}", "CUDA"), op
    with FakeTensorMode():
        args = {
            "cps_step": step_args("noise", True, torch.float32, (2, 9), "cuda"),
            "cps_logprob_kl": logprob_kl_args(True, torch.float32, (2, 9), "cuda"),
            "cps_logprob_kl_backward": backward_args(True, torch.float32, (2, 9), "cuda"),
        }
        assert choose_impl(args["cps_step"][0]) == "triton"
        for op in OPS:
            out = getattr(torch.ops.fastcps, op).default.redispatch(cuda, *args[op])
            assert all(isinstance(t, FakeTensor) for t in (out if isinstance(out, tuple) else [out]))
    assert calls == ["cps_step_fwd", "cps_logprob_kl_fwd", "cps_logprob_kl_bwd"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", STEP_CASES[:3], ids=str)
def test_opcheck_on_cuda(monkeypatch, case):
    """opcheck on CUDA inputs: the compiled Triton kernels under every check (needs a GPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: run the gpu tests with TRITON_INTERPRET=0")
    monkeypatch.setenv("FASTCPS_IMPL", "triton")
    assert_opcheck("cps_step", step_args(*case, device="cuda"))
    assert_opcheck("cps_logprob_kl", logprob_kl_args(True, case[2], case[3], "cuda"))
    assert_opcheck("cps_logprob_kl_backward", backward_args(True, case[2], case[3], "cuda"))
