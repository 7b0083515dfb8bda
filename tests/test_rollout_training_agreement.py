"""The log-probs stored at rollout equal the training forward's log-probs of the same samples.

For every sampler and both log-prob forms, the rollout (``rollout_epoch``: batches of 8) and the
training side (``recompute_old_logprobs``: minibatches of 2, through ``micro_step_loss``, the function
the update calls) score the same (x_t, x', σ). In fp32 they must agree to 1e-6 (relative). In bf16 the
two forwards may round differently (other batch sizes pick other kernels); the bound is derived from
bf16's precision below. Either check fails when the training side uses another step's coefficients or
σ (a shift of one step moves a log-prob by far more than the bound; see the last test).
"""

import pytest
import torch

from fastcps.policies import build_policy
from fastcps.rewards import RewardOutput
from fastcps.update import minibatches, recompute_old_logprobs
from wiring_support import toy_config, toy_rollout

BF16_EPS = 2.0**-8  # bf16's unit roundoff (8 significant bits)
# (sampler, extra config) runs: every sampler, an SDE window and timestep_fraction < 1 among them.
RUNS = {
    "cps": [],
    "cps-window": ["sampler.sde_window_size=2"],
    "cps-fraction": ["sampler.timestep_fraction=0.5"],
    "flow_sde": ["sampler.name=flow_sde"],
    "flow_sde-window": [
        "sampler.name=flow_sde",
        "sampler.sde_window_size=2",
        "sampler.sde_window_range=[1, 3]",
    ],
    "dance_sde": ["sampler.name=dance_sde", "sampler.timestep_fraction=0.6"],
    "cpws": [
        "sampler.name=cpws",
        "sampler.eta=0.3",
        "sampler.sde_window_size=1",
        "sampler.sde_window_range=[0, 1]",
    ],
    "dpmpp1_sde": ["sampler.name=dpmpp1_sde"],
}


class ConstantReward:
    parts = [("constant", 1.0, None)]

    def __call__(self, images, prompts, metadata):
        r = torch.ones(len(prompts))
        return RewardOutput(r, {"constant": r})


def rollout_and_training(run: str, logprob: str, dtype: str, epoch: int = 0, device: str = "cpu"):
    sets = RUNS[run] + [
        f"sampler.logprob={logprob}",
        f"policy.dtype={dtype}",
        "sampler.num_steps=4",
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=4",
        "train.rollout_batch_size=8",
        "train.minibatch_size=2",
    ]
    cfg = toy_config(sets)
    torch.manual_seed(0)
    device = torch.device(device)
    policy = build_policy(cfg.policy, device)
    data = toy_rollout(cfg, policy, epoch, reward=ConstantReward(), device=device)
    batches = minibatches(8, 2, (cfg.seed, epoch, 4, 0, 0), device)
    train = recompute_old_logprobs(policy, policy.transformer, data, batches, clip_range=1e-4)
    return cfg, policy, data, train


def bf16_bound(data, policy, k: float = 4.0) -> torch.Tensor:
    """|Δ log p| allowed per (sample, step) when the training forward's velocity differs from the
    rollout's by bf16 rounding. With d = x' − μ and μ' = μ + β·δv, log p = c − w·mean(d²) moves by
    w·|mean(2·β·d·δv − β²·δv²)| ≤ w·(2|β|·rms(d)·rms(δv) + β²·rms(δv)²) (Cauchy-Schwarz). Assume
    rms(δv) ≤ k·ε·rms(v) with ε = 2^-8 and k = 4 (the last layers' roundings add up; a whole
    transformer in bf16 is not exact to one rounding), rms(v) measured on the rollout's latents."""
    bounds = torch.zeros_like(data.log_prob)
    cond = {k_: t[data.cond_index] for k_, t in data.cond.items()}
    for j, step in enumerate(data.sampling.trained):
        c = data.sampling.coeffs[step]
        x, x_next = data.x_t[:, j], data.x_next[:, j]
        with torch.no_grad():
            v = policy.velocity(
                policy.transformer, x, data.sampling.sigmas[step].expand(x.shape[0]), cond
            ).float()
        rms = lambda t: t.reshape(t.shape[0], -1).pow(2).mean(1).sqrt()  # noqa: E731
        d = x_next - (c.alpha * x + c.beta * v)
        dv = k * BF16_EPS * rms(v)
        beta = c.beta.abs()
        bounds[:, j] = c.lp_w * (2 * beta * rms(d) * dv + beta**2 * dv**2)
    return bounds


@pytest.mark.parametrize("logprob", ["paper", "gaussian"])
@pytest.mark.parametrize("run", list(RUNS))
def test_fp32_rollout_and_training_log_probs_agree(run, logprob):
    cfg, _, data, train = rollout_and_training(run, logprob, "fp32")
    assert len(data.sampling.trained) >= 1
    if "window" in run:
        assert data.sampling.stochastic.count(True) == cfg.sampler.sde_window_size
    if "fraction" in run or run == "dance_sde":
        noisy = sum(
            data.sampling.stochastic
        )  # every stochastic step of these samplers injects noise but the last
        assert len(data.sampling.trained) < noisy
    torch.testing.assert_close(train, data.log_prob, rtol=1e-6, atol=1e-6 * float(data.log_prob.abs().max()))


@pytest.mark.parametrize("logprob", ["paper", "gaussian"])
@pytest.mark.parametrize("run", ["cps", "flow_sde-window", "dance_sde"])
def test_bf16_rollout_and_training_log_probs_agree_within_bf16_rounding(run, logprob):
    _, policy, data, train = rollout_and_training(run, logprob, "bf16")
    bound = bf16_bound(data, policy)
    gap = (train - data.log_prob).abs()
    assert bool((gap <= bound).all()), (
        f"max gap {float(gap.max()):.3g}, bound there {float(bound.flatten()[gap.argmax()]):.3g}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("logprob", ["paper", "gaussian"])
def test_on_cuda_through_the_triton_path(logprob, monkeypatch):
    """The same checks with the toy on a GPU, the rollout through the Triton step kernel and the
    training side through the Triton log-prob kernel (fp32 to 1e-5: GPU matmuls of other batch sizes
    round differently; bf16 within the bound)."""
    monkeypatch.setenv("FASTCPS_IMPL", "triton")
    _, _, data, train = rollout_and_training("flow_sde-window", logprob, "fp32", device="cuda")
    torch.testing.assert_close(train, data.log_prob, rtol=1e-5, atol=1e-5 * float(data.log_prob.abs().max()))
    _, policy, data, train = rollout_and_training("cps", logprob, "bf16", device="cuda")
    assert bool(((train - data.log_prob).abs() <= bf16_bound(data, policy)).all())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shift", ["coeffs", "sigma"])
def test_a_step_shifted_training_side_is_caught(monkeypatch, shift, dtype):
    """The checks can fail: a training side that scores step j with step j+1's coefficients, or feeds
    the model step j+1's σ, breaks the fp32 tolerance and the bf16 bound."""
    import fastcps.update as update

    real = update.micro_step_loss

    def shifted(policy, model, data, mb, j, *args, **kwargs):
        sampling = data.sampling
        if shift == "coeffs":
            sampling = sampling._replace(coeffs=sampling.coeffs[1:] + sampling.coeffs[:1])
        else:
            sampling = sampling._replace(sigmas=torch.cat([sampling.sigmas[1:], sampling.sigmas[-1:]]))
        return real(
            policy, model, type(data)(**{**data.__dict__, "sampling": sampling}), mb, j, *args, **kwargs
        )

    monkeypatch.setattr(update, "micro_step_loss", shifted)
    _, policy, data, train = rollout_and_training("cps", "paper", dtype)
    gap = (train - data.log_prob).abs()
    if dtype == "fp32":
        assert float(gap.max()) > 1e3 * 1e-6 * float(data.log_prob.abs().max())
    else:
        assert bool((gap > bf16_bound(data, policy)).any())
