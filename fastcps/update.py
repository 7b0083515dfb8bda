"""The update half of an epoch: advantages across ranks, old log-probs, the loss of one micro-step,
and the accumulation loop that feeds DeepSpeed.

Devices and synchronisation. Every tensor a micro-step touches lives on the model's device: the
stored latents and log-probs (rollout), the minibatch indices (moved once per pass), the advantages
(moved once per epoch). A micro-step never reads a device value on the host: its statistics and its
non-finite flag accumulate on the device, and the loop reads them once per optimizer step (the
optimizer's skip decision) and once per epoch (the metrics).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch

from fastcps import distributed as dist
from fastcps.grpo import LossOutput, compute_advantages, grpo_loss
from fastcps.logger import progress as progress_bar
from fastcps.ops.cps_logprob_kl import cps_logprob_kl
from fastcps.rollout import EpochData, module_mode, select
from fastcps.runtime import derive_seed, synchronize, to_device


class Advantages(NamedTuple):
    local: torch.Tensor  # (n,) fp32 on the model's device: this rank's samples, in its sample order
    rewards: torch.Tensor  # (n·world,) fp32, CPU: every rank's rewards, in rank order
    zero_std_frac: torch.Tensor  # 0-dim: fraction of groups whose rewards are all equal


def epoch_advantages(data: EpochData, train_cfg, device, *, rank: int = 0) -> Advantages:
    """Group advantages of this rank's samples. A group may span ranks, so rewards and group ids are
    gathered first (rank order: rank r's samples are rows r·n .. (r+1)·n − 1). Computed on the CPU in
    float64 (a few hundred numbers), then moved to the model's device once."""
    rewards = dist.all_gather_cat(data.reward)
    groups = dist.all_gather_cat(data.group)
    out = compute_advantages(
        rewards,
        groups,
        std=train_cfg.adv_std,
        clip=train_cfg.adv_clip_max,
        zero_std_threshold=train_cfg.zero_std_threshold,
        num_groups=train_cfg.prompts_per_epoch,
    )
    n = data.reward.shape[0]
    local = out.advantages[rank * n : (rank + 1) * n].float()
    return Advantages(to_device(local, device), rewards, out.zero_std_frac)


def minibatches(n: int, minibatch_size: int, seed_parts: tuple, device) -> list[torch.Tensor]:
    """A seeded permutation of this rank's n samples cut into minibatches, moved to the device once."""
    perm = torch.as_tensor(np.random.default_rng(derive_seed(*seed_parts)).permutation(n), dtype=torch.long)
    perm = to_device(perm, device)
    return [perm[i : i + minibatch_size] for i in range(0, n, minibatch_size)]


def rollout_batches(n: int, batch_size: int, seed_parts: tuple, device) -> list[torch.Tensor]:
    """The rollout's own batches (rows ``k·b .. (k+1)·b − 1``, in their rollout order) in a seeded order.

    A minibatch laid out as a rollout batch runs the training forward on the same rows in the same
    order and shape as the rollout's forward, so its log-probs can equal the rollout's bit for bit
    (checked, see ``run_update``). As a draw it is as good as ``minibatches``: a rank's samples are
    already in a random order (``epoch_slots`` permutes every slot), so each rollout batch is a
    uniformly random subset; only the order of the batches is drawn here."""
    order = np.random.default_rng(derive_seed(*seed_parts)).permutation(n // batch_size)
    rows = to_device(torch.arange(n, dtype=torch.long), device)
    return [rows[k * batch_size : (k + 1) * batch_size] for k in order.tolist()]


def micro_step_loss(
    policy,
    model,
    data: EpochData,
    mb: torch.Tensor,
    j: int,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    *,
    clip_range: float,
    beta_kl: float,
) -> tuple[LossOutput, torch.Tensor]:
    """The GRPO loss of the ``j``-th trained step for the samples ``mb`` (a device index tensor):
    one training forward, the reference forward when ``beta_kl > 0``, the fused log-prob/KL op with
    the coefficients the rollout used for that step, the clipped loss, the model in train mode (the
    reference too when it is the model with its LoRA adapters off, as in flow_grpo; the toy's and full
    fine-tuning's frozen copies stay in eval mode). Returns (loss output, log-prob).
    ``old_logp`` and ``adv`` are (len(mb),) on the device; ``old_logp = None`` takes this forward's own
    log-prob (detached) as the old one: the policy is still the rollout's, the ratio exactly 1."""
    step = data.sampling.trained[j]
    x_t, x_next = data.x_t[mb, j], data.x_next[mb, j]
    cond = select(data.cond, data.cond_index[mb])
    sigma = data.sampling.sigmas[step].expand(x_t.shape[0])
    v_ref = None
    # a flag read when the model is in train mode already, as the trainer's is once the rollout's eval ends
    with module_mode(model, True):
        v = policy.velocity(model, x_t, sigma, cond)
        if beta_kl > 0:
            with torch.no_grad(), policy.reference(model) as ref:
                v_ref = policy.velocity(ref, x_t, sigma, cond)
    logp, kl = cps_logprob_kl(x_t, v, x_next, data.sampling.coeffs[step], v_ref)
    if old_logp is None:
        old_logp = logp.detach().float()
    out = grpo_loss(
        logp, old_logp, adv, clip_range=clip_range, kl=kl if v_ref is not None else None, beta_kl=beta_kl
    )
    return out, logp


@torch.no_grad()
def recompute_old_logprobs(
    policy,
    model,
    data: EpochData,
    batches: list[torch.Tensor],
    *,
    clip_range: float,
    beta_kl: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Old log-probs of the samples in ``batches`` from the same forward the update runs, same
    minibatches, same order: their ratio is then exactly 1 while the policy is the rollout's. Other
    samples keep the rollout's log-probs (or ``out``'s, written in place). (The reference forward is
    skipped: it does not change the log-prob.)"""
    old = data.log_prob.clone() if out is None else out
    for mb in batches:
        zeros = torch.zeros(mb.shape[0], device=old.device)
        for j in range(len(data.sampling.trained)):
            old[mb, j] = (
                micro_step_loss(
                    policy, model, data, mb, j, old[mb, j], zeros, clip_range=clip_range, beta_kl=0.0
                )[1]
                .detach()
                .float()
            )
    return old


class UpdateStats:
    """Per-epoch loss statistics, accumulated on the device (no host reads per micro-step)."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float32, device=device)  # loss, kl, clipfrac, finite count
        self.ratio_dev = torch.zeros((), dtype=torch.float32, device=device)
        self.recompute_s = 0.0  # wall time of the old-log-prob forwards (host clock, read once)
        self.recomputed = None  # old_logprob = recompute: whether later windows needed their own forward

    def add(self, out: LossOutput, finite: torch.Tensor, first_window: bool) -> None:
        f = finite.to(torch.float32)
        vals = torch.stack([out.loss.detach().float(), out.kl_mean.float(), out.clipfrac.float(), f])
        self.sums += torch.where(finite, vals, torch.zeros_like(vals))
        if first_window:  # before the first optimizer step the policy is the rollout's: ratio 1
            self.ratio_dev = torch.fmax(self.ratio_dev, out.ratio_dev.float())  # fmax: a NaN is not a max

    def metrics(self) -> dict[str, float]:
        """Means over every rank's finite micro-steps (collective: all ranks call it)."""
        sums = dist.all_reduce(self.sums.detach().to(torch.float64).cpu())
        ratio_dev = dist.all_reduce(self.ratio_dev.detach().reshape(1).cpu(), torch.distributed.ReduceOp.MAX)
        n = float(sums[3])
        mean = [float(s) / n if n else float("nan") for s in sums[:3]]
        out = {
            "train/loss": mean[0],
            "train/kl": mean[1],
            "train/clipfrac": mean[2],
            "train/ratio_dev": float(ratio_dev[0]),
        }
        if self.recomputed is not None:  # the same on every rank (decided together)
            out["train/old_logprob_recomputed"] = float(self.recomputed)
        return out


def run_update(
    engine,
    optimizer,
    policy,
    data: EpochData,
    adv: torch.Tensor,
    train_cfg,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    after_optimizer_step=lambda skipped: None,
    progress: bool = False,
) -> UpdateStats | None:
    """``num_inner_epochs`` passes over this rank's samples; each optimizer step accumulates
    ``gradient_accumulation_steps`` minibatches × every trained step (DeepSpeed's boundary is driven
    explicitly). A micro-step whose loss is not finite flags its window: the optimizer skips it.
    ``after_optimizer_step(skipped)`` runs after each optimizer step. Returns the epoch's statistics,
    still on the device (``.metrics()`` reads them), or None when no step is trained. The loop
    itself reads nothing on the host: the optimizer's skip decision is the one synchronisation per
    optimizer step, and ``old_logprob = recompute`` reads one flag per epoch (below).

    ``old_logprob = recompute``: old log-probs are those of the training forward with the rollout's
    weights, so the ratio is exactly 1 until the first optimizer step. The first window's micro-steps
    take them from their own training forward (no extra pass). The later windows' samples need them
    before that step: when the minibatches are the rollout's batches (``minibatch_size ==
    rollout_batch_size``: same rows, order and shapes in both forwards) and every log-prob of the first
    window equals the rollout's bit for bit on every rank, the rollout's are those log-probs and are
    used as they are; otherwise (another layout, or a single bit differs anywhere) one no-grad forward
    per later minibatch and trained step computes them, after the first window's backward passes and
    before its optimizer step. Either way every micro-step is fed the same numbers."""
    t = train_cfg
    n_steps = len(data.sampling.trained)
    n = data.x_t.shape[0]
    if n_steps == 0:
        return None
    device = data.x_t.device
    stats = UpdateStats(device)
    loss_kw = dict(clip_range=t.clip_range, beta_kl=t.beta_kl)
    bar = progress_bar(
        total=t.num_inner_epochs * n * n_steps // t.minibatch_size,
        desc=f"epoch {epoch + 1} update",
        unit="micro-steps",
        enabled=progress,
    )
    old = data.log_prob
    ga = t.gradient_accumulation_steps
    for inner in range(t.num_inner_epochs):
        own = inner == 0 and t.old_logprob == "recompute"
        same_layout = own and t.minibatch_size == t.rollout_batch_size
        draw = rollout_batches if same_layout else minibatches
        batches = draw(n, t.minibatch_size, (seed, epoch, 4, inner, rank), device)
        if own:
            old = data.log_prob.clone()
            differs = torch.zeros((), dtype=torch.bool, device=device)  # any own log-prob != the rollout's
        for w in range(0, len(batches), ga):
            window = batches[w : w + ga]
            n_micro, k = len(window) * n_steps, 0
            bad = torch.zeros((), dtype=torch.bool, device=device)
            first = own and w == 0
            for mb in window:
                for j in range(n_steps):
                    k += 1
                    engine.set_gradient_accumulation_boundary(k == n_micro)
                    out, logp = micro_step_loss(
                        policy, engine, data, mb, j, None if first else old[mb, j], adv[mb], **loss_kw
                    )
                    if first:
                        own_logp = logp.detach().float()
                        if same_layout:  # the only case where the rollout's could stand in
                            differs = differs | (own_logp != data.log_prob[mb, j]).any()  # NaN differs too
                        old[mb, j] = own_logp
                    finite = torch.isfinite(out.loss)
                    bad = bad | ~finite
                    stats.add(out, finite, first_window=inner == 0 and w == 0)
                    engine.backward(out.loss / n_micro)
                    if first and k == n_micro:  # the policy is still the rollout's until the step below
                        stats.recomputed = _old_logprobs_of_later_windows(
                            policy,
                            engine,
                            data,
                            batches[ga:],
                            old,
                            reuse=same_layout,
                            differs=differs,
                            stats=stats,
                            **loss_kw,
                        )
                    if k == n_micro:
                        optimizer.skip_flag, optimizer.last_skipped = bad, False
                    engine.step()
                    bar.update(1)
            # Skipped by us (a non-finite loss or gradient) or by DeepSpeed (a non-finite gradient
            # norm: it then never calls the optimizer).
            after_optimizer_step(optimizer.last_skipped or not engine.was_step_applied())
            optimizer.skip_flag = None
    bar.close()
    return stats


def _old_logprobs_of_later_windows(
    policy,
    engine,
    data: EpochData,
    later: list[torch.Tensor],
    old: torch.Tensor,
    *,
    reuse: bool,
    differs: torch.Tensor,
    stats: UpdateStats,
    clip_range: float,
    beta_kl: float,
) -> bool:
    """Fill ``old`` for the samples of ``later`` (see ``run_update``); returns whether it recomputed.
    Every rank decides the same (ZeRO-3's forwards are collectives): a difference on any rank
    recomputes everywhere. One host read of a flag per epoch."""
    if not later:
        return False
    if reuse and not dist.any_rank(differs):
        return False  # ``old`` holds the rollout's log-probs there: bit for bit the training forward's
    t0 = time.perf_counter()
    recompute_old_logprobs(policy, engine, data, later, clip_range=clip_range, beta_kl=beta_kl, out=old)
    synchronize(data.x_t.device)
    stats.recompute_s = time.perf_counter() - t0
    return True
