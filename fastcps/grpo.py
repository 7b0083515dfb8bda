"""The GRPO math (docs/math.md, "GRPO: advantages and loss"; paper eq. 4-5): group advantages and the
clipped loss.

Pure torch functions on flat per-sample tensors: no models, no distributed code. Groups that span ranks
are gathered by the caller first (the advantage of a sample depends on its whole group).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["AdvantageOutput", "LossOutput", "compute_advantages", "grpo_loss"]


class AdvantageOutput(NamedTuple):
    advantages: Tensor  # [N], rewards' float dtype (float32 for integer rewards)
    zero_std_mask: Tensor  # [N] bool: the sample's group has (numerically) identical rewards
    zero_std_frac: Tensor  # 0-dim float: fraction of GROUPS (not samples) with zero std
    group_mean: Tensor  # [G] float64, groups in sorted order of their id (NaN for an absent id < num_groups)
    group_std: Tensor  # [G] float64, population std of each group (whatever `std` mode was used)


class LossOutput(NamedTuple):
    loss: Tensor  # 0-dim, the only output that carries gradient
    policy_loss: Tensor  # 0-dim, detached: the clipped-ratio term
    kl_mean: Tensor  # 0-dim, detached: mean(kl), 0 when kl is None
    ratio: Tensor  # [N], detached: exp(logp - old_logp)
    clipfrac: Tensor  # 0-dim, detached: fraction of samples with |ratio - 1| > clip_range
    ratio_dev: Tensor  # 0-dim, detached: max |ratio - 1|; 0 exactly on the first on-policy update


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: Literal["prompt", "global"] = "prompt",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    zero_std_threshold: float = 1e-6,
    num_groups: int | None = None,
) -> AdvantageOutput:
    """Group-relative advantages ``A = (r - mean_group) / (std + eps)``, clipped to ``±clip``.

    - ``group_ids``: integer id per sample (same id = same prompt); ids need not be contiguous and
      groups may have different sizes (e.g. after dropping failed rollouts).
    - ``std="prompt"``: each group's own std; ``"global"``: the std of all N rewards (more stable when
      K is small, at the price of reward-scale differences between prompts leaking into A).
    - Stds are population stds (``unbiased=False``): with K = 2 rewards {0, 1} the std is 0.5 and
      A = ±1/(1 + 2e-4) instead of ±0.707 with Bessel's correction. Flow-GRPO uses ``np.std``, same.
    - A group whose reward std is below ``zero_std_threshold`` gets advantage exactly 0: all its
      images are equally good, so there is no signal; without this, round-off of ~1e-7 divided by
      std + eps ≈ 1e-4 would be noise, and with eps = 0 it would blow up to ±clip. Single-sample groups
      count as zero-std.
    - Statistics are computed in float64: rewards such as PickScore sit near 22, where one float32 ulp
      is 1.9e-6 — above the 1e-6 threshold — so identical rewards could look like a non-zero std.

    - ``num_groups``: when the ids are known to be ``0 .. num_groups − 1`` (the trainer's prompt
      slots), they index the groups directly: no ``torch.unique``, whose output size depends on the
      values (a host synchronisation on a GPU, impossible on fake tensors). Groups with no sample
      are ignored.

    Vectorized with ``index_add_``: no Python loop. Values are checked on the host when they are
    there (CPU tensors: a ValueError naming the fix), else by a device-side assert (no host sync).
    """
    if std not in ("prompt", "global"):
        raise ValueError(f"compute_advantages: std must be 'prompt' or 'global', got {std!r}")
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(
            f"compute_advantages: rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}"
        )
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"compute_advantages: group_ids shape {tuple(group_ids.shape)} != rewards shape "
            f"{tuple(rewards.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise ValueError(f"compute_advantages: group_ids must be an integer tensor, got {group_ids.dtype}")
    if group_ids.device != rewards.device:
        raise ValueError(
            f"compute_advantages: group_ids on {group_ids.device} but rewards on {rewards.device}; move "
            "both to one device"
        )
    finite = torch.isfinite(rewards).all()
    if _on_host(rewards):
        if not bool(finite):
            bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()[:8]
            raise ValueError(
                f"compute_advantages: non-finite rewards at indices {bad}; fix the reward function "
                "(nothing is silently replaced)"
            )
    else:
        torch._assert_async(finite, "compute_advantages: non-finite rewards; fix the reward function")

    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.detach().to(torch.float64)
    if num_groups is None:
        groups, inv = torch.unique(group_ids, return_inverse=True)
        num_groups = groups.numel()
    else:
        inv = group_ids.long()
        in_range = ((inv >= 0) & (inv < num_groups)).all()
        if _on_host(inv):
            if not bool(in_range):
                raise ValueError(f"compute_advantages: group_ids must lie in [0, num_groups={num_groups})")
        else:
            torch._assert_async(in_range, "compute_advantages: group_ids must lie in [0, num_groups)")

    counts = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, inv, torch.ones_like(r)
    )
    group_mean = torch.zeros_like(counts).index_add_(0, inv, r) / counts
    centered = r - group_mean[inv]
    group_var = torch.zeros_like(counts).index_add_(0, inv, centered * centered) / counts
    group_std = group_var.sqrt()

    if std == "prompt":
        denom = group_std[inv]
    else:
        denom = r.std(unbiased=False).expand_as(r)
    adv = centered / (denom + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)

    present = counts > 0
    zero_group = present & (group_std < zero_std_threshold)
    zero_std_mask = zero_group[inv]
    adv = torch.where(zero_std_mask, torch.zeros_like(adv), adv)

    return AdvantageOutput(
        advantages=adv.to(out_dtype),
        zero_std_mask=zero_std_mask,
        zero_std_frac=zero_group.to(torch.float32).sum() / present.to(torch.float32).sum(),
        group_mean=group_mean,
        group_std=group_std,
    )


def _on_host(t: Tensor) -> bool:
    """Whether ``t``'s values can be read without a device synchronisation: a real CPU tensor, not
    one being traced by torch.compile or a fake tensor standing in for a device one."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t) and not torch.compiler.is_compiling()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    kl: Tensor | None = None,
    beta_kl: float = 0.0,
) -> LossOutput:
    """PPO-style clipped GRPO loss for one trained step: ``mean(max(-A·r, -A·clip(r, 1-ε, 1+ε))) +
    β·mean(kl)``.

    ``r = exp(logp - old_logp)``. The max of the two negated surrogates is the pessimistic bound: once
    the ratio has moved past 1 ± ε in the direction the advantage rewards (r > 1+ε for A > 0,
    r < 1-ε for A < 0) the clipped term wins and the sample's gradient is exactly 0, which is what keeps
    an update close to the rollout policy. Moves in the wrong direction stay unclipped.

    ``old_logp`` and ``advantages`` are constants of the rollout and are detached here. Computed in
    float32 whatever the input dtype: at logp == old_logp the ratio is exp(0) = 1 exactly, and the first
    on-policy update must see ratio_dev = 0 (docs/math.md: anchors see 0.98-1.02 from precision mismatch).
    Checking the loss for non-finite values is the caller's job (it costs a device sync).
    """
    if logp.shape != old_logp.shape or logp.shape != advantages.shape:
        # Broadcasting [N] against [N, 1] would silently build an N x N loss.
        raise ValueError(
            f"grpo_loss: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    if logp.numel() == 0:
        raise ValueError("grpo_loss: empty batch")
    if not clip_range > 0:
        raise ValueError(f"grpo_loss: clip_range must be > 0, got {clip_range}")
    if kl is None and beta_kl != 0.0:
        raise ValueError(f"grpo_loss: beta_kl={beta_kl} but no kl tensor was given")

    logp32 = logp.float()
    adv = advantages.detach().float()
    ratio = torch.exp(logp32 - old_logp.detach().float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    if kl is not None:
        if kl.shape != logp.shape:
            raise ValueError(f"grpo_loss: kl shape {tuple(kl.shape)} != logp shape {tuple(logp.shape)}")
        kl_mean = kl.float().mean()
        loss = policy_loss + beta_kl * kl_mean
    else:
        kl_mean = torch.zeros((), dtype=torch.float32, device=logp.device)
        loss = policy_loss

    with torch.no_grad():
        dev = (ratio - 1.0).abs()
        clipfrac = (dev > clip_range).float().mean()
        ratio_dev = dev.max()

    return LossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl_mean=kl_mean.detach(),
        ratio=ratio.detach(),
        clipfrac=clipfrac,
        ratio_dev=ratio_dev,
    )
