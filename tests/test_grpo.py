"""GRPO math against numbers computed by hand (docs/math.md, "GRPO: advantages and loss")."""

import math

import pytest
import torch

from fastcps.grpo import compute_advantages, grpo_loss

# Two interleaved groups with non-contiguous ids: id 0 has rewards [1, 2, 3], id 7 has [0, 4].
REWARDS = torch.tensor([0.0, 1.0, 4.0, 2.0, 3.0])
IDS = torch.tensor([7, 0, 7, 0, 0])
# id 0: mean 2, population std sqrt(2/3) = 0.816496580927726 -> A = ±1/(0.8164966 + 1e-4) =
# ±1.2245948897605123
# id 7: mean 2, population std 2                              -> A = ±2/(2 + 1e-4)         =
# ±0.9999500024998749


def test_prompt_std_by_hand():
    out = compute_advantages(REWARDS, IDS)
    expected = torch.tensor(
        [-0.9999500024998749, -1.2245948897605123, 0.9999500024998749, 0.0, 1.2245948897605123]
    )
    torch.testing.assert_close(out.advantages, expected, rtol=1e-6, atol=1e-7)
    assert out.advantages.dtype == torch.float32
    # groups in sorted id order: 0, then 7
    torch.testing.assert_close(out.group_mean, torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out.group_std, torch.tensor([math.sqrt(2 / 3), 2.0], dtype=torch.float64))
    assert not out.zero_std_mask.any() and float(out.zero_std_frac) == 0.0


def test_global_std_by_hand():
    # all 5 rewards: mean 2, population variance (4 + 1 + 4 + 0 + 1)/5 = 2 -> std sqrt(2) = 1.4142135623730951
    # A = (r - group mean)/(sqrt(2) + 1e-4): 1/1.41431356 = 0.7070567847218314, 2/1.41431356 =
    # 1.4141135694436628
    out = compute_advantages(REWARDS, IDS, std="global")
    expected = torch.tensor(
        [-1.4141135694436628, -0.7070567847218314, 1.4141135694436628, 0.0, 0.7070567847218314]
    )
    torch.testing.assert_close(out.advantages, expected, rtol=1e-6, atol=1e-7)
    # group_std still reports each group's own std
    torch.testing.assert_close(out.group_std, torch.tensor([math.sqrt(2 / 3), 2.0], dtype=torch.float64))


def test_zero_std_group_gets_exactly_zero_and_counts_per_group():
    # groups: {5, 5, 5} (no signal), {0, 1}, {2, 4}: 1 of 3 groups is zero-std (3 of 7 samples)
    rewards = torch.tensor([5.0, 0.0, 5.0, 2.0, 1.0, 5.0, 4.0])
    ids = torch.tensor([1, 2, 1, 3, 2, 1, 3])
    out = compute_advantages(rewards, ids)
    assert out.zero_std_mask.tolist() == [True, False, True, False, False, True, False]
    assert float(out.zero_std_frac) == pytest.approx(1 / 3)
    assert out.advantages[out.zero_std_mask].tolist() == [0.0, 0.0, 0.0]
    # {0, 1}: std 0.5 -> ±0.5/0.5001 = ±0.9998000399920016
    torch.testing.assert_close(
        out.advantages[[1, 4]], torch.tensor([-0.9998000399920016, 0.9998000399920016])
    )


def test_zero_std_is_robust_to_roundoff_and_eps_zero():
    # 21.7 is a PickScore-sized reward: one float32 ulp there is 1.9e-6, and float32 statistics of
    # three copies of 21.7 give std 1.9e-6 (checked), above the 1e-6 threshold; float64 gives ~1e-15.
    # 0.1 is not exactly representable either.
    rewards = torch.tensor([21.7, 21.7, 21.7, 0.1, 0.1, 0.1, 0.1], dtype=torch.float32)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    out = compute_advantages(rewards, ids, eps=0.0)
    assert out.advantages.tolist() == [0.0] * 7  # not NaN, not ±clip
    assert float(out.zero_std_frac) == 1.0


def test_single_sample_group_is_zero_std():
    out = compute_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert out.zero_std_mask.tolist() == [True, False, False]
    assert out.advantages[0].item() == 0.0


def test_clipping():
    # 49 zeros and one 1: p = 1/50, std = sqrt(0.02·0.98) = 0.14 exactly;
    # outlier 0.98/0.1401 = 6.995003568879372, the others -0.02/0.1401 = -0.14275517487508924
    rewards = torch.zeros(50, dtype=torch.float64)
    rewards[17] = 1.0
    ids = torch.zeros(50, dtype=torch.long)
    unclipped = compute_advantages(rewards, ids, clip=None).advantages
    assert unclipped[17].item() == pytest.approx(6.995003568879372, rel=1e-12)
    assert unclipped[0].item() == pytest.approx(-0.14275517487508924, rel=1e-12)
    clipped = compute_advantages(rewards, ids).advantages  # default clip 5
    assert clipped[17].item() == 5.0
    assert clipped[0].item() == pytest.approx(-0.14275517487508924, rel=1e-12)
    assert clipped.dtype == torch.float64
    assert compute_advantages(-rewards, ids, clip=3.0).advantages[17].item() == -3.0


@pytest.mark.parametrize("std", ["prompt", "global"])
def test_known_group_count_equals_the_unique_path(std):
    """The trainer passes num_groups (its prompt slots 0..G-1): no torch.unique, same numbers; a slot
    with no sample is ignored, also in zero_std_frac."""
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(24, generator=g)
    ids = torch.arange(6).repeat_interleave(4)[perm]  # groups spread over the batch, as over ranks
    rewards = torch.randn(24, generator=g)
    rewards[ids >= 4] = 0.5  # groups 4 and 5: identical rewards
    a = compute_advantages(rewards, ids, std=std)
    b = compute_advantages(rewards, ids, std=std, num_groups=6)
    torch.testing.assert_close(b.advantages, a.advantages, rtol=0, atol=0)
    torch.testing.assert_close(b.group_std, a.group_std, rtol=0, atol=0)
    assert float(a.zero_std_frac) == float(b.zero_std_frac) == pytest.approx(2 / 6)
    c = compute_advantages(rewards, ids + 1, std=std, num_groups=8)  # slots 0 and 7 are empty
    torch.testing.assert_close(c.advantages, a.advantages, rtol=0, atol=0)
    assert float(c.zero_std_frac) == float(a.zero_std_frac)
    with pytest.raises(ValueError, match="num_groups=6"):
        compute_advantages(rewards, ids + 1, num_groups=6)


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="non-finite rewards at indices \\[1\\]"):
        compute_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        compute_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        compute_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="'prompt' or 'global'"):
        compute_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), std="batch")


# ---------------------------------------------------------------------------------------------- loss
# ε = 0.2. Per sample, loss_i = max(-A·r, -A·clip(r, 0.8, 1.2)):
#   A =  2, r = 1.1: inside             -> -2.2,  d/dlogp = -A·r = -2.2
#   A =  2, r = 1.5: clipped (good way) -> -2.4,  d/dlogp = 0
#   A = -1, r = 0.5: clipped (good way) ->  0.8,  d/dlogp = 0
#   A = -1, r = 1.5: wrong way, kept    ->  1.5,  d/dlogp = -A·r = 1.5
# mean = (-2.2 - 2.4 + 0.8 + 1.5)/4 = -0.575; grad = [-2.2, 0, 0, 1.5]/4 = [-0.55, 0, 0, 0.375]
ADV = torch.tensor([2.0, 2.0, -1.0, -1.0])
RATIO = torch.tensor([1.1, 1.5, 0.5, 1.5])


def _logps(ratio):
    old = torch.tensor([-0.3, 1.7, 0.2, -2.0])
    logp = (old + torch.log(ratio)).requires_grad_(True)
    return logp, old


def test_loss_by_hand_and_gradients():
    logp, old = _logps(RATIO)
    out = grpo_loss(logp, old, ADV, clip_range=0.2)
    assert out.loss.item() == pytest.approx(-0.575, abs=1e-6)
    assert out.policy_loss.item() == pytest.approx(-0.575, abs=1e-6)
    assert out.kl_mean.item() == 0.0
    torch.testing.assert_close(out.ratio, RATIO)
    assert out.clipfrac.item() == 0.75  # |r - 1| = 0.1, 0.5, 0.5, 0.5 vs 0.2
    assert out.ratio_dev.item() == pytest.approx(0.5, abs=1e-6)
    assert not (out.ratio.requires_grad or out.clipfrac.requires_grad or out.ratio_dev.requires_grad)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.55, 0.0, 0.0, 0.375]))
    assert logp.grad[1].item() == 0.0 and logp.grad[2].item() == 0.0  # exactly zero when clipped


def test_loss_wrong_direction_is_not_clipped():
    # A = 2, r = 0.5: -A·r = -1.0 > -A·0.8 = -1.6, so the unclipped (pessimistic) term is kept
    logp, old = _logps(torch.tensor([0.5, 1.0, 1.0, 1.0]))
    out = grpo_loss(logp[:1], old[:1], ADV[:1], clip_range=0.2)
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-6)
    out.loss.backward()
    assert logp.grad[0].item() == pytest.approx(-1.0, abs=1e-6)


def test_loss_with_kl():
    logp, old = _logps(RATIO)
    kl = torch.tensor([0.1, 0.3, 0.2, 0.2], requires_grad=True)
    out = grpo_loss(logp, old, ADV, clip_range=0.2, kl=kl, beta_kl=0.5)
    # -0.575 + 0.5·0.2 = -0.475; dloss/dkl = 0.5/4 = 0.125
    assert out.kl_mean.item() == pytest.approx(0.2, abs=1e-7)
    assert out.loss.item() == pytest.approx(-0.475, abs=1e-6)
    assert out.policy_loss.item() == pytest.approx(-0.575, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(kl.grad, torch.full((4,), 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_on_policy_ratio_is_exactly_one(dtype):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(7, generator=g) * 30).to(dtype).requires_grad_(True)
    adv = torch.randn(7, generator=g)
    out = grpo_loss(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert (out.ratio == 1.0).all()
    assert out.ratio_dev.item() == 0.0 and out.clipfrac.item() == 0.0
    out.loss.backward()
    # at r = 1: loss = -mean(A), dloss/dlogp = -A/N
    assert out.loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    torch.testing.assert_close(logp.grad.float(), (-adv / 7).to(dtype).float())


def test_loss_input_errors():
    logp, old = _logps(RATIO)
    with pytest.raises(ValueError, match="same shape"):
        grpo_loss(logp, old[:, None], ADV, clip_range=0.2)
    with pytest.raises(ValueError, match="no kl tensor"):
        grpo_loss(logp, old, ADV, clip_range=0.2, beta_kl=0.1)
    with pytest.raises(ValueError, match="clip_range"):
        grpo_loss(logp, old, ADV, clip_range=0.0)


# ------------------------------------------------------------------ edges the mutation run found untested


def test_advantages_of_one_sample_and_of_integer_rewards():
    """A batch of one reward is valid (a zero-std group of one); integer rewards give float32 advantages."""
    out = compute_advantages(torch.tensor([3.0]), torch.tensor([0]))
    assert out.advantages.tolist() == [0.0] and out.zero_std_mask.tolist() == [True]
    ints = compute_advantages(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 0, 1, 1]))
    assert ints.advantages.dtype == torch.float32
    torch.testing.assert_close(
        ints.advantages, torch.tensor([-0.5 / 0.5001, 0.5 / 0.5001, -1 / 1.0001, 1 / 1.0001])
    )


def test_zero_std_threshold_is_strict():
    """A group whose std equals the threshold keeps its advantages (only std < threshold is no signal)."""
    rewards, ids = torch.tensor([0.0, 1.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1])  # stds 0.5 and 0
    out = compute_advantages(rewards, ids, zero_std_threshold=0.5)
    assert out.zero_std_mask.tolist() == [False, False, True, True]
    assert float(out.zero_std_frac) == 0.5


def test_advantage_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor, got shape \(2, 2\)"):
        compute_advantages(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor, got shape \(0,\)"):
        compute_advantages(torch.ones(0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor, got torch.complex64"):
        compute_advantages(torch.ones(2), torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="integer tensor, got torch.bool"):
        compute_advantages(torch.ones(2), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_ids on meta but rewards on cpu; move both to one device"):
        compute_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long, device="meta"))
    bad = torch.full((10,), float("inf"))
    with pytest.raises(
        ValueError,
        match=r"at indices \[0, 1, 2, 3, 4, 5, 6, 7\]; fix the reward function "
        r"\(nothing is silently replaced\)",
    ):
        compute_advantages(bad, torch.zeros(10, dtype=torch.long))  # the first 8 of 10 are listed


def test_advantages_on_fake_device_tensors_assert_on_the_device(monkeypatch):
    """Rewards on a (fake) CUDA device, or CPU tensors under fake-tensor tracing, are never read on the
    host: the finiteness and id-range checks become device-side asserts with their messages, and every
    output stays on the rewards' device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    asserted = []
    real_assert = torch._assert_async
    monkeypatch.setattr(
        torch, "_assert_async", lambda ok, msg: (asserted.append(msg), real_assert(ok, msg))[1]
    )
    for device in ("cuda", "cpu"):
        asserted.clear()
        with FakeTensorMode(allow_non_fake_inputs=True):
            rewards = torch.randn(6, device=device)
            out = compute_advantages(rewards, torch.arange(6, device=device) % 3, num_groups=3)
        assert asserted == [
            "compute_advantages: non-finite rewards; fix the reward function",
            "compute_advantages: group_ids must lie in [0, num_groups)",
        ], device
        for name, t in zip(out._fields, out):
            assert t.device.type == device, (name, t.device)


def test_clipfrac_counts_only_ratios_strictly_outside_the_range():
    """clipfrac is the fraction with |r − 1| > ε: a ratio exactly at the edge is not counted."""
    logp, old = torch.tensor([0.5, 0.0]), torch.zeros(2)
    edge = float((torch.exp(logp[:1]) - 1.0).abs())  # ε equal to the first sample's |r − 1|, bit for bit
    out = grpo_loss(logp, old, torch.ones(2), clip_range=edge)
    assert out.clipfrac.item() == 0.0 and out.ratio_dev.item() == edge


def test_loss_errors_and_kl_free_outputs_on_the_batch_device():
    logp, old = _logps(RATIO)
    with pytest.raises(ValueError, match="^grpo_loss: empty batch$"):
        grpo_loss(torch.ones(0), torch.ones(0), torch.ones(0), clip_range=0.2)
    with pytest.raises(ValueError, match=r"grpo_loss: kl shape \(3,\) != logp shape \(4,\)"):
        grpo_loss(logp, old, ADV, clip_range=0.2, kl=torch.ones(3))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = grpo_loss(*(torch.zeros(4, device="cuda") for _ in range(3)), clip_range=0.2)
    assert out.kl_mean.device.type == "cuda" and out.kl_mean.dtype == torch.float32


def test_kl_free_loss_metrics_are_fp32_whatever_the_default_dtype(float64_default):
    logp, old = _logps(RATIO)
    out = grpo_loss(logp.float(), old.float(), ADV.float(), clip_range=0.2)
    assert out.kl_mean.dtype == torch.float32 and out.loss.dtype == torch.float32
