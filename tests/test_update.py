"""The update's statistics (fastcps.update.UpdateStats): what the logs' train/loss, train/kl,
train/clipfrac and train/ratio_dev mean. A wrong mean here misleads every run's reader silently; the
trainer's other tests only check that the numbers exist. Across ranks: tests/test_wiring_runs.py."""

import math

import torch

from fastcps.grpo import LossOutput
from fastcps.update import UpdateStats


def loss_output(loss, kl, clipfrac, ratio_dev):
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    return LossOutput(loss=t(loss), policy_loss=t(loss), kl_mean=t(kl), ratio=torch.ones(2), clipfrac=t(clipfrac),
                      ratio_dev=t(ratio_dev))


def test_means_over_finite_micro_steps_and_ratio_dev_over_the_first_window():
    stats = UpdateStats("cpu")
    steps = [(loss_output(1.0, 0.5, 0.25, 0.1), True),   # first window
             (loss_output(2.0, 1.5, 0.75, 0.3), False),  # after the first optimizer step: not in ratio_dev
             (loss_output(float("nan"), 9.0, 9.0, float("nan")), True),  # non-finite: left out of every mean
             (loss_output(3.0, 1.0, 0.5, 0.05), True)]
    for out, first_window in steps:
        stats.add(out, torch.isfinite(out.loss), first_window)
    m = stats.metrics(world=1)
    assert m == {"train/loss": 2.0, "train/kl": 1.0, "train/clipfrac": 0.5, "train/ratio_dev": 0.10000000149011612}
    assert stats.sums.dtype == torch.float32 and stats.sums.device.type == "cpu"


def test_no_finite_micro_step_gives_nan_means_not_an_error():
    stats = UpdateStats("cpu")
    assert stats.recompute_s == 0.0
    out = loss_output(float("inf"), 1.0, 1.0, 0.5)
    stats.add(out, torch.isfinite(out.loss), first_window=True)
    m = stats.metrics(world=1)
    assert all(math.isnan(m[k]) for k in ("train/loss", "train/kl", "train/clipfrac"))
    assert m["train/ratio_dev"] == 0.5
