"""The drop-in function against the anchors' own step code (FlowCPS / Flow-GRPO / Dance-GRPO),
transcribed here op by op as they compute it, in fp32."""

import math

import pytest
import torch

import fastcps
from fastcps import sde_step_with_logprob
from fastcps.schedule import flow_sigmas

SIGMAS = flow_sigmas(10, shift=3.0)


def bview(t, like):
    return t.view(-1, *([1] * (like.ndim - 1)))


def flow_grpo_step(
    model_output,
    sample,
    sigma,
    sigma_prev,
    sigma_max,
    noise_level,
    prev_sample=None,
    noise=None,
    sde_type="sde",
):
    """flow_grpo's sde_step_with_logprob (its 'sde' and 'cps' branches)."""
    model_output, sample = model_output.float(), sample.float()
    sigma, sigma_prev = bview(sigma, sample), bview(sigma_prev, sample)
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
        log_prob = (
            -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
            - torch.log(std_dev_t * torch.sqrt(-1 * dt))
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        )
    else:
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output
        noise_estimate = sample + model_output * (1 - sigma)
        prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
            sigma_prev**2 - std_dev_t**2
        )
        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * noise
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean


def dance_flux_step(model_output, latents, eta, sigma, sigma_next, prev_sample=None, noise=None):
    """DanceGRPO's flux_step with sde_solver=True, grpo=True (scalar σ, as it is called)."""
    dsigma = sigma_next - sigma
    prev_sample_mean = latents + dsigma * model_output
    pred_original_sample = latents - sigma * model_output
    delta_t = sigma - sigma_next
    std_dev_t = eta * math.sqrt(delta_t)
    score_estimate = -(latents - pred_original_sample * (1 - sigma)) / sigma**2
    log_term = -0.5 * eta**2 * score_estimate
    prev_sample_mean = prev_sample_mean + log_term * dsigma
    if prev_sample is None:
        prev_sample = prev_sample_mean + noise * std_dev_t
    log_prob = (
        -((prev_sample.detach().float() - prev_sample_mean.float()) ** 2) / (2 * std_dev_t**2)
        - math.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean


def rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("impl", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("index", [0, 3, 8, 9])
@pytest.mark.parametrize("shape", [(2, 16, 64), (1, 4, 8, 8)], ids=str)
def test_cps_equals_flowcps_code(impl, index, shape):
    v, x, eps = rand(shape, index)
    b = shape[0]
    sig, nxt = SIGMAS[index].repeat(b), SIGMAS[index + 1].repeat(b)
    want_prev, want_lp, want_mean = flow_grpo_step(
        v, x, sig, nxt, float(SIGMAS[1]), 0.8, noise=eps, sde_type="cps"
    )
    out = sde_step_with_logprob(v, x, sig, nxt, noise=eps)
    torch.testing.assert_close(out.prev_sample, want_prev, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out.mean, want_mean, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out.log_prob, want_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.std, nxt * math.sin(0.8 * math.pi / 2))
    # training: score the stored sample, gradients flow to the model output
    vg = v.clone().requires_grad_(True)
    train = sde_step_with_logprob(
        vg, x, float(SIGMAS[index]), float(SIGMAS[index + 1]), prev_sample=want_prev
    )
    torch.testing.assert_close(train.log_prob.detach(), want_lp, atol=1e-6, rtol=1e-6)
    train.log_prob.sum().backward()
    va = v.clone().requires_grad_(True)
    flow_grpo_step(va, x, sig, nxt, float(SIGMAS[1]), 0.8, prev_sample=want_prev, sde_type="cps")[
        1
    ].sum().backward()
    torch.testing.assert_close(vg.grad, va.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("index", [0, 4, 9])
def test_flow_sde_equals_flow_grpo_code(impl, index):
    v, x, eps = rand((3, 8, 16), 10 + index)
    sig, nxt = SIGMAS[index].repeat(3), SIGMAS[index + 1].repeat(3)
    smax = float(SIGMAS[1])
    want_prev, want_lp, want_mean = flow_grpo_step(v, x, sig, nxt, smax, 0.7, noise=eps)
    out = sde_step_with_logprob(v, x, sig, nxt, sampler="flow_sde", noise=eps, sigma_max=smax)
    torch.testing.assert_close(out.prev_sample, want_prev, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out.mean, want_mean, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out.log_prob, want_lp, atol=1e-5, rtol=1e-6)
    scored = sde_step_with_logprob(v, x, sig, nxt, sampler="flow_sde", prev_sample=want_prev, sigma_max=smax)
    torch.testing.assert_close(scored.log_prob, want_lp, atol=1e-5, rtol=1e-6)


def test_flow_sde_at_sigma_one_needs_sigma_max():
    v, x, _ = rand((2, 5), 0)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_with_logprob(v, x, 1.0, float(SIGMAS[1]), sampler="flow_sde")


@pytest.mark.parametrize("impl", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("index", [0, 5, 9])
def test_dance_sde_equals_dance_grpo_code(impl, index):
    v, x, eps = rand((2, 12, 64), 20 + index)
    s, n = float(SIGMAS[index]), float(SIGMAS[index + 1])
    want_prev, want_lp, want_mean = dance_flux_step(v, x, 0.3, s, n, noise=eps)
    out = sde_step_with_logprob(v, x, s, n, sampler="dance_sde", noise=eps)
    torch.testing.assert_close(out.prev_sample, want_prev, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out.mean, want_mean, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out.log_prob, want_lp, atol=1e-5, rtol=1e-6)


def test_noise_sources_and_logprob_override():
    v, x, _ = rand((2, 3, 4), 3)
    a = sde_step_with_logprob(v, x, 0.5, 0.3, generator=torch.Generator().manual_seed(7))
    b = sde_step_with_logprob(v, x, 0.5, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.prev_sample, b.prev_sample)
    s1 = sde_step_with_logprob(v, x, 0.5, 0.3, seed=11)
    s2 = sde_step_with_logprob(v, x, 0.5, 0.3, seed=11)
    assert torch.equal(s1.prev_sample, s2.prev_sample) and not torch.equal(s1.prev_sample, a.prev_sample)
    gauss = sde_step_with_logprob(v, x, 0.5, 0.3, prev_sample=a.prev_sample, logprob="gaussian")
    s = float(a.std[0])
    want = (
        -((a.prev_sample - a.mean) ** 2).mean((1, 2)) / (2 * s * s)
        - math.log(s)
        - 0.5 * math.log(2 * math.pi)
    )
    torch.testing.assert_close(gauss.log_prob, want, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="drop noise"):
        sde_step_with_logprob(v, x, 0.5, 0.3, prev_sample=x, noise=x)
    with pytest.raises(ValueError, match="at most one source"):
        sde_step_with_logprob(v, x, 0.5, 0.3, seed=1, generator=torch.Generator())


def test_every_sampler_runs_and_eta_zero_is_ode():
    v, x, eps = rand((2, 6, 4), 5)
    ode = sde_step_with_logprob(v, x, 0.6, 0.4, sampler="ode", noise=eps)
    for name in fastcps.SAMPLERS:
        out = sde_step_with_logprob(
            v, x, 0.6, 0.4, sampler=name, noise=eps, eta=0.3 if name == "cpws" else None
        )
        assert out.prev_sample.shape == x.shape and torch.isfinite(out.log_prob).all(), name
    for name in ("cps", "flow_sde", "dance_sde"):
        out = sde_step_with_logprob(v, x, 0.6, 0.4, sampler=name, eta=0.0, noise=eps, logprob="paper")
        torch.testing.assert_close(out.prev_sample, ode.prev_sample, atol=0, rtol=0)


def test_public_import():
    assert fastcps.sde_step_with_logprob is sde_step_with_logprob
    assert fastcps.StepOutput._fields == ("prev_sample", "log_prob", "mean", "std")


# --- the KL each sampler trains with equals its anchor's training code ----------------------------------


def flow_grpo_std_dev_t(sigma, sigma_max, noise_level):
    """Flow-GRPO's sde_step_with_logprob returns this std_dev_t (no √dt) and scripts/train_sd3.py divides
    its KL by 2·std_dev_t²."""
    return torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level


def kl_of(sampler, v, v_ref, x, prev, sig, nxt, eta=None, kl=None):
    c = fastcps.step_coeffs(sampler, sig, nxt, eta, sigma_max=SIGMAS[1], kl=kl)
    return fastcps.cps_logprob_kl(x, v, prev, c, v_ref).kl


@pytest.mark.parametrize("index", [0, 3, 9])
def test_kl_of_each_sampler_equals_its_anchor(index):
    shape = (2, 16, 64)
    v, x, eps = rand(shape, 10 + index)
    v_ref = v + 0.1 * rand(shape, 20 + index)[0]
    b, dims = shape[0], (1, 2)
    sig, nxt = SIGMAS[index].repeat(b), SIGMAS[index + 1].repeat(b)
    if index < 9:  # FlowCPS, scripts/train_sd3.py: kl_loss = ((μ − μ_ref)**2).mean(dims), unnormalised
        prev, _, mu = flow_grpo_step(v, x, sig, nxt, SIGMAS[1], 0.8, noise=eps, sde_type="cps")
        mu_ref = flow_grpo_step(v_ref, x, sig, nxt, SIGMAS[1], 0.8, prev_sample=prev, sde_type="cps")[2]
        want = ((mu - mu_ref) ** 2).mean(dim=dims)
        torch.testing.assert_close(kl_of("cps", v, v_ref, x, prev, sig, nxt), want, rtol=1e-5, atol=1e-9)
    # Flow-GRPO, scripts/train_sd3.py: ((μ − μ_ref)**2).mean(dims) / (2·std_dev_t**2), sigma_max rule at σ = 1
    prev, _, mu = flow_grpo_step(v, x, sig, nxt, SIGMAS[1], 0.7, noise=eps)
    mu_ref = flow_grpo_step(v_ref, x, sig, nxt, SIGMAS[1], 0.7, prev_sample=prev)[2]
    std_dev_t = flow_grpo_std_dev_t(sig, SIGMAS[1], 0.7)
    want = ((mu - mu_ref) ** 2).mean(dim=dims) / (2 * std_dev_t**2)
    torch.testing.assert_close(kl_of("flow_sde", v, v_ref, x, prev, sig, nxt), want, rtol=1e-5, atol=1e-9)
    # ... and by name: the Gaussian form (Flow-GRPO's paper, eq. 6: s = std_dev_t·√Δ) and the unnormalised one
    s2 = (std_dev_t * torch.sqrt(sig - nxt)) ** 2
    torch.testing.assert_close(
        kl_of("flow_sde", v, v_ref, x, prev, sig, nxt, kl="gaussian"),
        ((mu - mu_ref) ** 2).mean(dim=dims) / (2 * s2),
        rtol=1e-5,
        atol=1e-9,
    )
    torch.testing.assert_close(
        kl_of("flow_sde", v, v_ref, x, prev, sig, nxt, kl="paper"),
        ((mu - mu_ref) ** 2).mean(dim=dims),
        rtol=1e-5,
        atol=1e-9,
    )
    # DanceGRPO has no KL in its code: the Gaussian form of its step, std_dev_t = η·√Δ (flux_step)
    s, n = float(SIGMAS[index]), float(SIGMAS[index + 1])
    prev, _, mu = dance_flux_step(v, x, 0.3, s, n, noise=eps)
    mu_ref = dance_flux_step(v_ref, x, 0.3, s, n, prev_sample=prev)[2]
    want = ((mu - mu_ref) ** 2).mean(dim=dims) / (2 * (0.3 * math.sqrt(s - n)) ** 2)
    torch.testing.assert_close(kl_of("dance_sde", v, v_ref, x, prev, sig, nxt), want, rtol=1e-5, atol=1e-9)


def test_unknown_kl_form_is_named():
    with pytest.raises(ValueError, match="kl must be one of"):
        fastcps.step_coeffs("cps", 0.5, 0.4, kl="reverse")
