"""Every check the samplers' math must pass (docs/math.md), one test each, plus the Figure 2 numbers."""

import math

import pytest
import torch

from fastcps import SAMPLERS, cps_step, step_coeffs
from fastcps.schedule import flow_sigmas

PRESERVING = ["cps", "cpws", "dpmpp1_sde"]


def schedule(num_steps, shift):
    return flow_sigmas(num_steps, shift=shift)


def step_pairs(num_steps=10, shift=3.0):
    s = schedule(num_steps, shift)
    return s[:-1], s[1:], float(s[1])


def test_registry_and_defaults():
    assert set(SAMPLERS) == {"cps", "flow_sde", "dance_sde", "ode", "cpws", "dpmpp1_sde"}
    assert SAMPLERS["cps"].default_eta == 0.8
    assert SAMPLERS["flow_sde"].default_eta == 0.7
    assert SAMPLERS["dance_sde"].default_eta == 0.3
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        step_coeffs("nope", 0.5, 0.4)


def test_figure2_schedule_is_the_papers():
    sig = schedule(10, 3.0)
    want = [1, 0.964, 0.923, 0.875, 0.818, 0.75, 0.667, 0.562, 0.429, 0.25, 0]
    torch.testing.assert_close(sig, torch.tensor(want), atol=6e-4, rtol=0)


@pytest.mark.parametrize("name", PRESERVING)
@pytest.mark.parametrize("num_steps,shift", [(10, 3.0), (4, 3.0), (28, 1.0), (6, 2.5)])
def test_coefficients_preserving(name, num_steps, shift):
    sig, nxt, smax = step_pairs(num_steps, shift)
    eta = 0.5 if name == "cpws" else None  # cpws needs s <= σ', so its last step is excluded below
    if name == "cpws":
        sig, nxt = sig[1:-1], nxt[1:-1]
    c = step_coeffs(name, sig.double(), nxt.double(), eta, sigma_max=smax)
    torch.testing.assert_close(c.a0, 1 - nxt, atol=1e-7, rtol=0)
    torch.testing.assert_close(torch.sqrt(c.a1**2 + c.s**2), nxt, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["flow_sde", "dance_sde"])
def test_sde_samplers_add_excess_noise(name):
    sig, nxt, smax = step_pairs(10, 3.0)
    c = step_coeffs(name, sig, nxt, sigma_max=smax)
    lhs = c.a1.double() ** 2 + c.s.double() ** 2
    s, sg, sn = c.s.double(), sig.double(), nxt.double()
    rhs = sn**2 + s**2 * (1 - sn / sg) + s**4 / (4 * sg**2)  # eq. 11
    torch.testing.assert_close(lhs, rhs, atol=1e-6, rtol=1e-6)
    assert bool((c.s > 0).all()) and bool((lhs > sn**2).all())


def test_figure2_numbers():
    sig, nxt, smax = step_pairs(10, 3.0)
    level = {}
    for name, eta in [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.7)]:
        c = step_coeffs(name, sig, nxt, eta, sigma_max=smax)
        level[name] = float(torch.sqrt(c.a1[-1] ** 2 + c.s[-1] ** 2))
    assert level["flow_sde"] == pytest.approx(0.218, abs=1e-3)
    assert level["dance_sde"] == pytest.approx(0.157, abs=1e-3)
    assert level["cps"] == 0.0
    sig4, nxt4, smax4 = step_pairs(4, 3.0)
    c = step_coeffs("flow_sde", sig4, nxt4, 0.7, sigma_max=smax4)
    assert float(torch.sqrt(c.a1[-1] ** 2 + c.s[-1] ** 2)) == pytest.approx(0.552, abs=1e-3)


def test_theorem1_flow_sde_converges_to_cpws():
    """Flow-SDE's a1 = σ' − s²/(2σ) is the first-order expansion of CPWS's sqrt(σ'² − s²); their
    per-step difference shrinks as the number of steps grows."""
    eta, diffs = 0.3, []
    for n in (10, 20, 40, 80, 160):
        sig, nxt, smax = step_pairs(n, 3.0)
        keep = (sig < 1) & (sig <= 0.9) & (nxt >= 0.1)  # a fixed σ range, away from both ends
        flow = step_coeffs("flow_sde", sig[keep].double(), nxt[keep].double(), eta)
        cpws = step_coeffs("cpws", sig[keep].double(), nxt[keep].double(), eta)
        diffs.append(float((flow.a1 - cpws.a1).abs().max()))
    assert all(b < a for a, b in zip(diffs, diffs[1:])), diffs
    order = math.log(diffs[-2] / diffs[-1]) / math.log(2)
    assert order > 0.9, (diffs, order)  # per-step difference is O(1/N)


@pytest.mark.parametrize("name", ["cps", "flow_sde", "dance_sde"])
def test_eta_zero_is_the_ode_step(name):
    sig, nxt, smax = step_pairs(10, 3.0)
    c = step_coeffs(name, sig, nxt, 0.0, sigma_max=smax)
    ode = step_coeffs("ode", sig, nxt)
    for field in ("a0", "a1", "s", "alpha", "beta"):
        torch.testing.assert_close(getattr(c, field), getattr(ode, field), atol=0, rtol=0)


def test_last_step_cps_is_deterministic_and_lands_on_x0_hat():
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(3, 5, 7, generator=g) for _ in range(3))
    sigma = torch.tensor([0.25, 0.4, 0.1])
    c = step_coeffs("cps", sigma, 0.0, 0.8)
    assert bool((c.s == 0).all())
    out = cps_step(x, v, c, noise=eps, return_mean=True)
    x0_hat = x - sigma.view(-1, 1, 1) * v
    torch.testing.assert_close(out.prev_sample, out.mean, atol=0, rtol=0)
    torch.testing.assert_close(out.prev_sample, x0_hat, atol=1e-6, rtol=1e-6)


def test_alpha_beta_match_the_endpoint_form():
    sig, nxt, smax = step_pairs(6, 3.0)
    for name in SAMPLERS:
        if name == "cpws":
            continue
        c = step_coeffs(name, sig, nxt, sigma_max=smax)
        torch.testing.assert_close(c.alpha, c.a0 + c.a1)
        torch.testing.assert_close(c.beta, -sig * c.a0 + (1 - sig) * c.a1)


def test_dpmpp1_is_finite_at_both_ends():
    c = step_coeffs("dpmpp1_sde", torch.tensor([1.0, 0.3]), torch.tensor([0.8, 0.0]))
    assert bool(torch.isfinite(torch.stack(list(c[:5]))).all())
    assert float(c.a1[0]) == 0.0 and float(c.s[0]) == pytest.approx(0.8)  # e^(−h) = 0 at σ = 1
    assert float(c.s[1]) == 0.0 and float(c.a1[1]) == 0.0  # σ' = 0: deterministic x̂0


def test_gaussian_weights_and_paper_weights():
    c = step_coeffs("flow_sde", 0.5, 0.4, 0.7)
    assert float(c.lp_w) == pytest.approx(1 / (2 * float(c.s) ** 2), rel=1e-6)
    assert float(c.lp_c) == pytest.approx(-math.log(float(c.s)) - 0.5 * math.log(2 * math.pi), rel=1e-6)
    p = step_coeffs("cps", 0.5, 0.4)
    assert float(p.lp_w) == 1.0 and float(p.lp_c) == 0.0 and float(p.kl_w) == 1.0
    g = step_coeffs("cps", 0.5, 0.4, logprob="gaussian")
    assert float(g.lp_w) == pytest.approx(1 / (2 * float(g.s) ** 2), rel=1e-6)
    # a deterministic step has no Gaussian density: NaN, never trained, never silently 0
    assert math.isnan(float(step_coeffs("cps", 0.5, 0.0, logprob="gaussian").lp_w))


def test_per_sample_tensors_and_errors():
    c = step_coeffs("cps", torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.0]), torch.tensor([0.8, 0.2]))
    assert c.s.shape == (2,) and c.s.dtype == torch.float32
    with pytest.raises(ValueError, match="sigma_max"):
        step_coeffs("flow_sde", 1.0, 0.9)
    with pytest.raises(ValueError, match="sigma_next"):
        step_coeffs("cps", 0.5, 0.6)
    with pytest.raises(ValueError, match="disagree"):
        step_coeffs("cps", torch.tensor([0.9, 0.5]), 0.1, batch_size=3)
    with pytest.raises(ValueError, match="cpws needs"):
        step_coeffs("cpws", 0.25, 0.0, 0.7)
    with pytest.raises(ValueError, match="logprob must be"):
        step_coeffs("cps", 0.5, 0.4, logprob="laplace")


# ------------------------------------------------------------------ edges the mutation run found untested


def test_dpmpp1_sde_is_the_dpm_solver_step_in_log_snr():
    """DPM-Solver++(1S) SDE in λ = log((1 − σ)/σ): a1 = σ'·e^(−h), s = σ'·sqrt(1 − e^(−2h)), h = λ' − λ
    (the preserving test above holds for any e^(−h), so the value itself is checked here)."""
    sig, nxt = torch.tensor([0.9, 0.6, 0.35]), torch.tensor([0.7, 0.3, 0.1])
    lam = lambda s: torch.log((1 - s.double()) / s.double())  # noqa: E731
    e_minus_h = torch.exp(-(lam(nxt) - lam(sig)))
    c = step_coeffs("dpmpp1_sde", sig, nxt)
    torch.testing.assert_close(c.a1.double(), nxt.double() * e_minus_h, rtol=1e-6, atol=0)
    torch.testing.assert_close(c.s.double(), nxt.double() * torch.sqrt(1 - e_minus_h**2), rtol=1e-6, atol=0)


def test_sigma_one_takes_sigma_max_for_flow_sde_and_cpws():
    """At σ = 1, Flow-GRPO's std uses σ_max (the schedule's second sigma) in 1 − σ; CPWS shares that std."""
    want = 0.3 * (1.0 / (1 - 0.95)) ** 0.5 * (1.0 - 0.97) ** 0.5
    for name in ("flow_sde", "cpws"):
        c = step_coeffs(name, 1.0, 0.97, 0.3, sigma_max=0.95)
        assert float(c.s) == pytest.approx(want, rel=1e-6), name
    with pytest.raises(
        ValueError,
        match=r"^flow_sde at sigma = 1 needs sigma_max: Flow-GRPO replaces sigma by the "
        r"schedule's second sigma \(sigmas\[1\]\) there. Pass sigma_max=sigmas\[1\].$",
    ):
        step_coeffs("cpws", 1.0, 0.97, 0.3)
    with pytest.raises(ValueError, match=r"^sigma_max must be < 1 \(the schedule's second sigma\), got 1.0$"):
        step_coeffs("flow_sde", 1.0, 0.97, sigma_max=1.0)
    assert float(step_coeffs("flow_sde", 0.9, 0.8, sigma_max=1.0).s) > 0  # σ < 1: σ_max is not used


def test_cpws_std_bound_is_inclusive_and_names_the_sample():
    """s = σ' is allowed (η = 0 at σ' = 0: the deterministic last step); the error names the first sample
    with s > σ'."""
    c = step_coeffs("cpws", 0.5, 0.0, 0.0)
    assert float(c.s) == 0.0 and float(c.a1) == 0.0
    msg = (
        r"^cpws needs its Wiener std s <= sigma_next \(eq. 17\). Lower eta, or use cps \(whose std is "
        r"sigma_next·sin\(eta·pi/2\)\) for that step \(sample 1 has s = 0.0866 > sigma_next = 0\)$"
    )
    with pytest.raises(ValueError, match=msg):
        step_coeffs("cpws", torch.tensor([0.5, 0.25]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.3]))


def test_errors_show_tensor_values_as_lists():
    with pytest.raises(ValueError, match=r"^sigma must lie in \(0, 1\], got \[0.5, 1.5\]$"):
        step_coeffs("cps", torch.tensor([0.5, 1.5]), torch.tensor([0.1, 0.1]))


def test_range_checks_name_the_values_at_the_edges():
    """Numbers are checked after their conversion to (B,) fp32 on the host, so the message lists them."""
    for sigma, nxt, msg in [
        (0.0, 0.0, r"^sigma must lie in \(0, 1\], got \[0.0\]$"),
        (1.5, 0.5, r"^sigma must lie in \(0, 1\], got \[1.5\]$"),
        (
            0.5,
            0.5,
            r"^sigma_next must satisfy 0 <= sigma_next < sigma, got sigma=\[0.5\], "
            r"sigma_next=\[0.5\]$",
        ),
        (
            0.5,
            -0.25,
            r"^sigma_next must satisfy 0 <= sigma_next < sigma, got sigma=\[0.5\], "
            r"sigma_next=\[-0.25\]$",
        ),
    ]:
        with pytest.raises(ValueError, match=msg):
            step_coeffs("cps", sigma, nxt)
    assert float(step_coeffs("cps", 1.0, 0.0).a0) == 1.0  # both ends of the closed intervals are allowed


def test_gaussian_forms_are_nan_not_inf_at_zero_std():
    c = step_coeffs("cps", 0.5, 0.0, logprob="gaussian", kl="gaussian")
    assert math.isnan(float(c.lp_w)) and math.isnan(float(c.lp_c)) and math.isnan(float(c.kl_w))
    assert math.isnan(float(step_coeffs("dance_sde", 0.5, 0.4, 0.0).kl_w))


# "meta" tensors stand in for a GPU's: they have a device and a shape but no values to read or copy out.


def test_host_inputs_are_checked_on_the_host_then_moved_to_the_device():
    """Numbers and CPU tensors are computed and checked on the host (a ValueError with the values), and
    the coefficients go to ``device`` in one copy at the end."""
    c = step_coeffs("cps", torch.tensor([0.9, 0.5]), 0.3, device="meta")
    assert [(t.device.type, tuple(t.shape)) for t in c] == [("meta", (2,))] * len(c)
    with pytest.raises(ValueError, match=r"^sigma must lie in \(0, 1\], got \[0.5, 1.5\]$"):
        step_coeffs("cps", torch.tensor([0.5, 1.5]), 0.1, device="meta")


@pytest.mark.parametrize("on_device", ["sigma", "sigma_next", "eta", "sigma_max"])
def test_one_device_input_keeps_everything_on_the_device(monkeypatch, on_device):
    """One input on the device sends the whole computation there: nothing is copied to the host (a meta
    tensor cannot be), every check is a device-side assert, Python numbers are still checked as numbers."""
    asserted = []
    real_assert = torch._assert_async
    monkeypatch.setattr(
        torch, "_assert_async", lambda ok, msg: (asserted.append(msg.split(" ")[0]), real_assert(ok, msg))[1]
    )
    args = {"sigma": torch.tensor([1.0, 0.5]), "sigma_next": 0.4, "eta": 0.7, "sigma_max": 0.95}
    args[on_device] = torch.as_tensor(args[on_device]).to("meta")
    c = step_coeffs(
        "flow_sde", args["sigma"], args["sigma_next"], args["eta"], sigma_max=args["sigma_max"], device="meta"
    )
    assert [(t.device.type, tuple(t.shape)) for t in c] == [("meta", (2,))] * len(c)
    assert {"sigma", "sigma_next", "sigma_max"} <= set(asserted) or on_device == "eta", asserted
    if on_device != "sigma":  # σ on the host, a bad one: checked on the device with the rest, not read here
        asserted.clear()
        step_coeffs(
            "flow_sde",
            torch.tensor([1.5, 0.5]),
            args["sigma_next"],
            args["eta"],
            sigma_max=args["sigma_max"],
            device="meta",
        )
        assert "sigma" in asserted
    with pytest.raises(ValueError, match=r"^eta must be >= 0 for cps, got -0.1$"):
        step_coeffs("cps", torch.tensor([0.5, 0.5], device="meta"), 0.3, -0.1)


def test_fake_tensors_are_never_read():
    """torch.compile's fake tensors (CPU ones here, used outside their mode) have no values: the checks on
    them are device-side asserts, and Python numbers under an active fake mode are still checked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        sig, nxt = torch.tensor([0.9, 0.5]), torch.tensor([0.3, 0.2])
    c = step_coeffs("cpws", sig, nxt, 0.3)
    assert type(c.s).__name__ == "FakeTensor" and c.s.shape == (2,)
    with mode, pytest.raises(ValueError, match="sigma_next must satisfy"):
        step_coeffs("cps", 0.5, 0.6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_coefficients_are_fp32_whatever_the_default_dtype(name, float64_default):
    """A notebook's torch.set_default_dtype(torch.float64) must not turn the coefficients (which the
    kernels read as fp32) into fp64: Python numbers and the KL's NaN fill are made fp32 explicitly."""
    c = step_coeffs(name, 0.6, 0.4, 0.7, batch_size=2)
    assert {t.dtype for t in c} == {torch.float32}, name
