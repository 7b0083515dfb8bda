"""The update loop's contract (fastcps.update): what the logs' train/loss, train/kl, train/clipfrac and
train/ratio_dev mean, the loss scaling under accumulation, the non-finite flag of a window, the old
log-probs' source. A wrong value here trains or logs wrongly without failing a run; the trainer's other
tests check results end to end. Across ranks: tests/test_wiring_runs.py."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import fastcps.rollout as rollout_mod
import fastcps.update as update_mod
from fastcps.grpo import LossOutput
from fastcps.logger import progress
from fastcps.ops.cps_logprob_kl import cps_logprob_kl
from fastcps.policies import build_policy
from fastcps.rollout import select
from fastcps.update import UpdateStats, epoch_advantages
from wiring_support import FlagOptimizer, RecordingEngine, toy_config, toy_rollout


def loss_output(loss, kl, clipfrac, ratio_dev):
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    return LossOutput(
        loss=t(loss),
        policy_loss=t(loss),
        kl_mean=t(kl),
        ratio=torch.ones(2),
        clipfrac=t(clipfrac),
        ratio_dev=t(ratio_dev),
    )


def test_means_over_finite_micro_steps_and_ratio_dev_over_the_first_window(float64_default):
    stats = UpdateStats("cpu")
    steps = [
        (loss_output(1.0, 0.5, 0.25, 0.1), True),  # first window
        (loss_output(2.0, 1.5, 0.75, 0.3), False),  # after the first optimizer step: not in ratio_dev
        (loss_output(float("nan"), 9.0, 9.0, float("nan")), True),  # non-finite: left out of every mean
        (loss_output(3.0, 1.0, 0.5, 0.05), True),
    ]
    for out, first_window in steps:
        stats.add(out, torch.isfinite(out.loss), first_window)
    m = stats.metrics()
    assert m == {
        "train/loss": 2.0,
        "train/kl": 1.0,
        "train/clipfrac": 0.5,
        "train/ratio_dev": 0.10000000149011612,
    }
    assert stats.sums.tolist() == [6.0, 3.0, 1.5, 3.0]  # loss, kl, clipfrac, finite count
    assert stats.sums.dtype == stats.ratio_dev.dtype == torch.float32 and stats.sums.device.type == "cpu"


def test_no_finite_micro_step_gives_nan_means_not_an_error():
    stats = UpdateStats("cpu")
    assert stats.recompute_s == 0.0
    out = loss_output(float("inf"), 1.0, 1.0, 0.5)
    stats.add(out, torch.isfinite(out.loss), first_window=True)
    m = stats.metrics()
    assert all(math.isnan(m[k]) for k in ("train/loss", "train/kl", "train/clipfrac"))
    assert m["train/ratio_dev"] == 0.5


def test_metrics_pool_every_ranks_micro_steps_and_take_the_largest_ratio_dev(monkeypatch):
    """At 2 ranks: the sums (loss, kl, clipfrac, finite count) add over ranks before dividing, so a rank
    with more finite micro-steps weighs more; ratio_dev is the largest of the ranks'. The other rank's
    values come through a stand-in for the collective that applies the op it is given."""
    stats = UpdateStats("cpu")
    for out in (loss_output(1.0, 0.5, 0.25, 0.1), loss_output(3.0, 1.5, 0.75, 0.2)):
        stats.add(out, torch.isfinite(out.loss), first_window=True)
    other_rank = {4: torch.tensor([8.0, 1.0, 0.0, 1.0]), 1: torch.tensor([0.7])}  # by the tensor's size
    reduce = {torch.distributed.ReduceOp.SUM: torch.sum, torch.distributed.ReduceOp.MAX: torch.amax}
    monkeypatch.setattr(
        update_mod.dist,
        "all_reduce",
        lambda t, op=torch.distributed.ReduceOp.SUM: reduce[op](
            torch.stack([t, other_rank[t.numel()].to(t.dtype)]), dim=0
        ),
    )
    m = stats.metrics()
    assert m == pytest.approx(
        {"train/loss": 12 / 3, "train/kl": 3 / 3, "train/clipfrac": 1 / 3, "train/ratio_dev": 0.7}
    )


# ---- run_update's loop on the toy, real CPU tensors -------------------------------------------------------

# 4 samples in minibatches of 2, one minibatch per optimizer step: two windows per pass.
SETS = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=2",
    "train.rollout_batch_size=2",
    "train.minibatch_size=2",
    "train.gradient_accumulation_steps=1",
]


def toy_epoch(sets):
    cfg = toy_config(SETS + sets)
    policy = build_policy(cfg.policy, "cpu")
    data = toy_rollout(cfg, policy, 0)
    return cfg, policy, data, epoch_advantages(data, cfg.train, torch.device("cpu")).local


def recorded_losses(monkeypatch, make_nan=lambda call: False):
    """Wraps micro_step_loss (training calls only): the outputs in call order; ``make_nan(call)`` turns
    that call's loss into NaN."""
    real, outs = update_mod.micro_step_loss, []

    def wrapped(*args, **kwargs):
        out, logp = real(*args, **kwargs)
        if torch.is_grad_enabled():
            if make_nan(len(outs)):
                out = out._replace(loss=out.loss * float("nan"))
            outs.append(out)
        return out, logp

    monkeypatch.setattr(update_mod, "micro_step_loss", wrapped)
    return outs


@pytest.mark.parametrize("old_logprob", ["recompute", "rollout"])
def test_loss_scaling_skip_flags_and_ratio_dev_of_the_first_window(monkeypatch, old_logprob):
    """One trained step (an SDE window of 1), 2 passes x 2 windows: each backward gets loss / n_micro; a
    non-finite loss flags its window's optimizer step and no other; after_optimizer_step hears 'applied';
    ratio_dev is the first window's, against old log-probs recomputed (or the rollout's, here shifted by
    0.01-0.04 per sample so that every window's ratio_dev differs)."""
    cfg, policy, data, adv = toy_epoch(
        ["sampler.sde_window_size=1", f"train.old_logprob={old_logprob}", "train.num_inner_epochs=2"]
    )
    assert len(data.sampling.trained) == 1
    data.log_prob = data.log_prob + 0.01 * torch.arange(1, 5)[:, None]  # a different ratio for every sample
    outs = recorded_losses(monkeypatch, make_nan=lambda call: call == 3)  # the last window of pass 2
    opt, skips = FlagOptimizer(), []
    engine = RecordingEngine(policy.transformer, opt)
    stats = update_mod.run_update(
        engine, opt, policy, data, adv, cfg.train, epoch=0, seed=0, rank=0, after_optimizer_step=skips.append
    )
    assert len(outs) == 4 and [float(x) for x in engine.losses[:3]] == [
        float(o.loss.detach()) for o in outs[:3]
    ]  # n_micro = 1
    assert (
        [bool(f) for f in engine.skip_flags] == [False, False, False, True]
        and skips == [False] * 4
        and opt.skip_flag is None
    )
    m = stats.metrics()
    first = float(outs[0].ratio_dev)
    assert m["train/ratio_dev"] == first
    if (
        old_logprob == "rollout"
    ):  # the other windows' ratio_dev differ from the first's (so the check can tell)
        later = [float(o.ratio_dev) for o in outs[1:3]]  # pass 1's second window, pass 2's first
        assert first not in later and first < max(later), (first, later)
    assert (first == 0.0) == (old_logprob == "recompute")  # recomputed: exactly on-policy
    assert (stats.recompute_s > 0) == (old_logprob == "recompute") and stats.recompute_s < 60
    assert m["train/loss"] == pytest.approx(sum(float(o.loss.detach()) for o in outs[:3]) / 3, rel=1e-6)


def fed_old_logprobs(monkeypatch, cfg, policy, data, adv, any_rank=None):
    """run_update with recording: (old log-probs fed to every training micro-step, no-grad recompute
    calls, stats, whether each fed loss had a gradient); ``any_rank`` replaces the cross-rank vote
    (another rank's answer)."""
    fed, recomputes, grads = [], [], []
    real_loss, real_step = update_mod.grpo_loss, update_mod.micro_step_loss

    def loss(logp, old_logp, *args, **kwargs):
        if torch.is_grad_enabled():
            fed.append(old_logp.clone())
            grads.append(logp.requires_grad)
        return real_loss(logp, old_logp, *args, **kwargs)

    def step(policy, model, data, mb, j, *args, **kwargs):
        if not torch.is_grad_enabled():
            recomputes.append((mb.tolist(), j))
        return real_step(policy, model, data, mb, j, *args, **kwargs)

    monkeypatch.setattr(update_mod, "grpo_loss", loss)
    monkeypatch.setattr(update_mod, "micro_step_loss", step)
    if any_rank is not None:
        monkeypatch.setattr(update_mod.dist, "any_rank", any_rank)
    opt = FlagOptimizer()
    stats = update_mod.run_update(
        RecordingEngine(policy.transformer, opt), opt, policy, data, adv, cfg.train, epoch=0, seed=0, rank=0
    )
    return fed, recomputes, stats, grads


def test_recompute_runs_only_for_later_windows_and_feeds_the_rollout_policys_log_probs(monkeypatch):
    """old_logprob = recompute with 2 windows x 2 passes: the first window's micro-steps take their own
    forward's log-prob as the old one (ratio exactly 1, and the loss still has its gradient); the
    recompute forward runs for the second window's samples only; every micro-step of both passes is fed
    the log-probs of the rollout's policy, exactly what a recompute of every sample before any step gives."""
    cfg, policy, data, adv = toy_epoch(["sampler.sde_window_size=2", "train.num_inner_epochs=2"])
    n_steps, n = len(data.sampling.trained), data.x_t.shape[0]
    data.log_prob = data.log_prob + 0.01 * torch.arange(1, n + 1)[:, None]  # the rollout's, told apart
    # minibatch_size == rollout_batch_size: the first pass trains on the rollout's batches
    first_pass = update_mod.rollout_batches(n, 2, (0, 0, 4, 0, 0), torch.device("cpu"))
    before = update_mod.recompute_old_logprobs(policy, policy.transformer, data, first_pass, clip_range=1e-4)
    fed, recomputes, stats, grads = fed_old_logprobs(monkeypatch, cfg, policy, data, adv)
    assert recomputes == [(first_pass[1].tolist(), j) for j in range(n_steps)]  # window 2 of pass 1 only
    second_pass = update_mod.minibatches(n, 2, (0, 0, 4, 1, 0), torch.device("cpu"))
    order = [(mb, j) for batches in (first_pass, second_pass) for mb in batches for j in range(n_steps)]
    assert len(fed) == len(order) == 2 * 2 * n_steps and all(grads)
    for (mb, j), old in zip(order, fed):
        assert torch.equal(old, before[mb, j]), (mb, j)
    assert stats.metrics()["train/ratio_dev"] == 0.0
    assert not torch.isclose(before, data.log_prob).any()


class ScriptedEngine(RecordingEngine):
    """Each optimizer step ends as ``script`` says: (our optimizer skipped it for a non-finite gradient,
    the engine applied it). The two are independent under DeepSpeed: its fp16 loss scaler skips steps
    on its own, and a step our optimizer refused still counts as applied to the engine."""

    def __init__(self, module, optimizer, script):
        super().__init__(module, optimizer)
        self.script, self.applied = list(script), True

    def step(self) -> None:
        super().step()
        if self.boundary:
            self.optimizer.last_skipped, self.applied = self.script.pop(0)

    def was_step_applied(self) -> bool:
        return self.applied


def test_after_optimizer_step_hears_skipped_when_either_side_skipped():
    """The EMA and the step counter follow ``after_optimizer_step(skipped)``: a step is skipped when our
    optimizer refused it or the engine did not apply it, and only then (4 optimizer steps: 2 passes x 2)."""
    cfg, policy, data, adv = toy_epoch(["sampler.sde_window_size=1", "train.num_inner_epochs=2"])
    opt, heard = FlagOptimizer(), []
    engine = ScriptedEngine(
        policy.transformer, opt, [(True, True), (False, False), (True, False), (False, True)]
    )
    update_mod.run_update(
        engine, opt, policy, data, adv, cfg.train, epoch=0, seed=0, after_optimizer_step=heard.append
    )
    assert heard == [True, True, True, False] and engine.script == []


def test_accumulation_divides_each_micro_loss_by_the_window(monkeypatch, capsys):
    cfg, policy, data, adv = toy_epoch(["sampler.sde_window_size=2", "train.gradient_accumulation_steps=2"])
    outs = recorded_losses(monkeypatch)
    opt = FlagOptimizer()
    engine = RecordingEngine(policy.transformer, opt)
    update_mod.run_update(engine, opt, policy, data, adv, cfg.train, epoch=0, seed=0, rank=0)
    n_micro = 2 * 2  # 2 minibatches x 2 trained steps in the one window
    assert len(outs) == n_micro and [bool(f) for f in engine.skip_flags] == [False]
    assert [float(x) for x in engine.losses] == pytest.approx(
        [float(o.loss.detach()) / n_micro for o in outs], rel=1e-6
    )
    assert "[fastcps]" not in capsys.readouterr().err  # no progress lines unless asked for


def test_progress_counts_the_work_it_reports(monkeypatch, capsys):
    """The plain progress lines (logs read later) name the epoch and count what was done: the rollout's
    images, the update's micro-steps; a terminal bar's total is the number of updates it will get."""
    bars = []

    def recording(*args, **kwargs):
        bars.append((kwargs, progress(*args, **kwargs)))
        return bars[-1][1]

    monkeypatch.setattr(rollout_mod, "progress_bar", recording)
    monkeypatch.setattr(update_mod, "progress_bar", recording)
    cfg = toy_config(SETS + ["train.num_inner_epochs=2"])
    policy = build_policy(cfg.policy, "cpu")
    data = toy_rollout(cfg, policy, 2, progress=True)
    adv = epoch_advantages(data, cfg.train, torch.device("cpu")).local
    opt = FlagOptimizer()
    update_mod.run_update(
        RecordingEngine(policy.transformer, opt),
        opt,
        policy,
        data,
        adv,
        cfg.train,
        epoch=2,
        seed=0,
        progress=True,
    )
    micro = 2 * 2 * len(data.sampling.trained)  # 2 passes x 2 minibatches x the trained steps
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[fastcps]")]
    assert [line.split(" in ")[0] for line in lines] == [
        "[fastcps] epoch 3 rollout: 4 images",
        f"[fastcps] epoch 3 update: {micro} micro-steps",
    ]
    update_kwargs, update_bar = bars[1]
    assert (
        type(update_kwargs["total"]) is int
        and update_kwargs["total"] == update_bar.n == micro
        and update_bar.closed
    )


@pytest.mark.parametrize("beta_kl", [0.0, 0.5])
def test_kl_term_is_beta_times_the_kl_to_the_weights_training_started_from(monkeypatch, beta_kl):
    """micro_step_loss's β·KL: the KL of the fused op between the trained velocity and the velocity of the
    weights the run started from (a copy taken before the weights moved), at the step's σ and prompts;
    with β = 0 no reference forward runs and train/kl logs 0. Zero advantages and the current log-probs as
    old ones make the policy term 0, so the loss is β·KL alone."""
    cfg, policy, data, _ = toy_epoch(["sampler.sde_window_size=2"])
    start = copy.deepcopy(policy.transformer).requires_grad_(False)
    with torch.no_grad():  # the trained weights move away from the reference
        for p in policy.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    entered = []
    real_reference = policy.reference
    monkeypatch.setattr(policy, "reference", lambda model: (entered.append(model), real_reference(model))[1])

    mb, j = (
        torch.tensor([2, 0]),
        len(data.sampling.trained) - 1,
    )  # the last trained step, samples out of order
    step = data.sampling.trained[j]
    x_t, x_next, cond = data.x_t[mb, j], data.x_next[mb, j], select(data.cond, data.cond_index[mb])
    sigma = data.sampling.sigmas[step].expand(2)
    with torch.no_grad():
        v, v_start = (policy.velocity(m, x_t, sigma, cond) for m in (policy.transformer, start))
        logp, kl = cps_logprob_kl(x_t, v, x_next, data.sampling.coeffs[step], v_start)
    assert float(kl.mean()) > 1e-6  # the moved weights are visibly off the reference

    out, out_logp = update_mod.micro_step_loss(
        policy, policy.transformer, data, mb, j, logp, torch.zeros(2), clip_range=1e-4, beta_kl=beta_kl
    )
    torch.testing.assert_close(out_logp.detach(), logp, rtol=1e-6, atol=1e-6)
    expected_kl = float(kl.mean()) if beta_kl > 0 else 0.0
    assert float(out.kl_mean) == pytest.approx(expected_kl, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(beta_kl * expected_kl, rel=1e-5, abs=1e-12)
    assert entered == ([policy.transformer] if beta_kl > 0 else [])


@pytest.mark.parametrize("rank", [0, 1])
def test_epoch_advantages_are_this_ranks_rows_of_groups_spanning_ranks(monkeypatch, rank):
    """Rank ``rank`` of 2: the other rank's rewards and group ids arrive through the gather (in rank order);
    each group's mean and population std cover both ranks; this rank gets its own rows, in fp32, and the
    configured zero-std threshold (not compute_advantages' default) zeroes group 1 (std 0.01 < 0.1)."""
    mine = SimpleNamespace(reward=torch.tensor([1.0, 5.00, 3.0, 5.02]), group=torch.tensor([0, 1, 0, 1]))
    other = {torch.float32: torch.tensor([2.0, 6.0, 5.01, 4.99]), torch.int64: torch.tensor([0, 0, 1, 1])}
    ranks = lambda t: [other[t.dtype], t] if rank == 1 else [t, other[t.dtype]]
    monkeypatch.setattr(update_mod.dist, "all_gather_cat", lambda t: torch.cat(ranks(t)))
    train_cfg = SimpleNamespace(
        adv_std="prompt", adv_clip_max=5.0, zero_std_threshold=0.1, prompts_per_epoch=2
    )

    out = epoch_advantages(mine, train_cfg, torch.device("cpu"), rank=rank)
    g0 = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=torch.float64)  # group 0's rewards: both ranks
    expected = (
        (torch.tensor([1.0, 3.0], dtype=torch.float64) - g0.mean()) / (g0.std(unbiased=False) + 1e-4)
    ).float()
    assert out.local.dtype == torch.float32 and out.local.shape == (4,)
    torch.testing.assert_close(out.local[[0, 2]], expected, rtol=1e-6, atol=0)
    assert out.local[[1, 3]].tolist() == [0.0, 0.0]  # group 1: std 0.01, below the configured threshold
    assert float(out.zero_std_frac) == 0.5
    assert out.rewards.tolist() == torch.cat(ranks(mine.reward)).tolist()


def test_minibatch_orders_are_seeded_permutations():
    a = update_mod.minibatches(10, 4, (0, 3, 4, 0, 0), torch.device("cpu"))
    assert [len(b) for b in a] == [4, 4, 2] and all(b.dtype == torch.long for b in a)
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    same = update_mod.minibatches(10, 4, (0, 3, 4, 0, 0), torch.device("cpu"))
    other_pass = update_mod.minibatches(10, 4, (0, 3, 4, 1, 0), torch.device("cpu"))
    assert torch.equal(torch.cat(a), torch.cat(same)) and not torch.equal(torch.cat(a), torch.cat(other_pass))


@pytest.mark.parametrize("case", ["equal", "one_ulp", "other_rank", "other_layout"])
def test_rollout_log_probs_replace_the_recompute_only_when_bitwise_equal(monkeypatch, case):
    """old_logprob = recompute, 2 windows: the later window's old log-probs are the rollout's when the
    minibatches are the rollout's batches and every first-window log-prob equals the rollout's bit for
    bit on every rank (no recompute forward); one ulp off in one value, a difference on another rank, or
    another batch layout recomputes. Every micro-step is fed the recompute's numbers either way (fp32
    on the CPU: the rollout's forward and the training forward give the same bits, the premise)."""
    sets = ["sampler.sde_window_size=2"]
    if case == "other_layout":
        sets += ["train.rollout_batch_size=4"]
    cfg, policy, data, adv = toy_epoch(sets)
    n_steps, n = len(data.sampling.trained), data.x_t.shape[0]
    draw = update_mod.minibatches if case == "other_layout" else update_mod.rollout_batches
    batches = draw(n, 2, (0, 0, 4, 0, 0), torch.device("cpu"))
    truth = update_mod.recompute_old_logprobs(policy, policy.transformer, data, batches, clip_range=1e-4)
    if case != "other_layout":
        assert torch.equal(
            truth, data.log_prob
        )  # the premise: same rows, order and shapes give the same bits
    else:  # equal bits by construction: the layout alone must send it to the recompute
        data.log_prob = truth.clone()
    if case == "one_ulp":  # the first window's first sample, last trained step: the next float up
        row = batches[0][0]
        data.log_prob[row, -1] = torch.nextafter(data.log_prob[row, -1], torch.tensor(float("inf")))
    vote = (lambda flag: True) if case == "other_rank" else None
    fed, recomputes, stats, _ = fed_old_logprobs(monkeypatch, cfg, policy, data, adv, any_rank=vote)
    expect_recompute = case != "equal"
    assert stats.recomputed is expect_recompute
    assert stats.metrics()["train/old_logprob_recomputed"] == float(expect_recompute)
    assert recomputes == ([(batches[1].tolist(), j) for j in range(n_steps)] if expect_recompute else [])
    order = [(mb, j) for mb in batches for j in range(n_steps)]
    assert len(fed) == len(order)
    for (mb, j), old in zip(order, fed):
        assert torch.equal(old, truth[mb, j]), (case, mb, j)
    assert stats.metrics()["train/ratio_dev"] == 0.0
