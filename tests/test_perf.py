"""perf/tflops and perf/mfu (fastcps.perf): the ledger prices every transformer call the trainer makes
at the FLOPs measured on that call's first occurrence; the totals equal torch's own FlopCounterMode
around the same epoch, phase by phase; the device peak table and the metric arithmetic."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastcps.perf as perf
from fastcps.optim import SkippingAdamW
from fastcps.policies import build_policy
from fastcps.prompts import load_prompts
from fastcps.rollout import PromptEncodings, epoch_steps, rollout_epoch
from fastcps.update import epoch_advantages, run_update
from wiring_support import PlainEngine, brightness_reward, toy_config

SETS = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=4",
    "train.rollout_batch_size=4",
    "train.minibatch_size=2",
    "train.gradient_accumulation_steps=2",
    "sampler.sde_window_size=2",
]


def epoch(cfg, policy, engine, optimizer, ledger=None):
    """One rollout and one update of the toy; returns FlopCounterMode's FLOPs of each half."""
    counted = {}
    for phase in ("rollout", "update"):
        if ledger is not None:
            ledger.phase = phase
        with FlopCounterMode(display=False) as fc:
            if phase == "rollout":
                data = rollout_epoch(
                    cfg,
                    0,
                    epoch_steps(cfg, 0, policy),
                    policy,
                    engine,
                    brightness_reward(),
                    PromptEncodings(policy),
                    load_prompts("digits"),
                    device=torch.device("cpu"),
                )
            else:
                adv = epoch_advantages(data, cfg.train, torch.device("cpu")).local
                run_update(engine, optimizer, policy, data, adv, cfg.train, epoch=0, seed=0)
        counted[phase] = fc.get_total_flops()
    return counted


def test_ledger_prices_every_call_as_flop_counter_mode_counts_it():
    """The ledger's rollout and update FLOPs equal FlopCounterMode's over the same epoch, up to the FLOPs
    outside the transformer (the step and log-prob ops: a few element-wise ops per latent, counted by
    neither ledger nor formula registry in the same way) -- here under 1 %. Removing the backward's
    price, or pricing every call at the first batch's cost, breaks the equality."""
    cfg = toy_config(SETS)
    torch.manual_seed(0)
    policy = build_policy(cfg.policy, "cpu")
    optimizer = SkippingAdamW(policy.trainable_parameters(), lr=1e-4)
    engine = PlainEngine(policy.transformer, optimizer, {})
    ledger = perf.FlopLedger(policy, engine)
    reference = epoch(cfg, policy, engine, optimizer, ledger)
    got = ledger.take()
    assert got["rollout"] > 0 and got["update"] > got["rollout"] / 4
    for phase in ("rollout", "update"):
        assert got[phase] == pytest.approx(reference[phase], rel=0.01), (phase, got, reference)
    assert set(ledger.backward_cost) == {2} and ledger.backward_cost[2] > 0  # minibatches of 2
    assert ledger.take() == {}  # take() starts again


def test_ledger_counts_calls_after_the_first_without_measuring():
    """Only the first call of a kind runs under the counting mode: later calls cost a dict update."""
    calls = []

    class Policy:
        def velocity(self, model, latents, sigma, cond):
            calls.append(torch.is_grad_enabled())
            return latents @ torch.ones(latents.shape[-1], latents.shape[-1])

    engine = SimpleNamespace(backward=lambda loss: None)
    ledger = perf.FlopLedger(policy := Policy(), engine)
    with torch.no_grad():
        for _ in range(3):
            policy.velocity(None, torch.ones(2, 5, 3), None, None)
    assert ledger.forward_cost == {(False, 2): 2 * 2 * 5 * 3 * 3}  # one (10 x 3) @ (3 x 3) matmul
    assert ledger.take() == {"rollout": 3 * 2 * 2 * 5 * 3 * 3}


def test_peak_table_and_metrics(monkeypatch):
    assert perf.peak_tflops("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert perf.peak_tflops("cuda:0") == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert perf.peak_tflops("cuda:0") == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert perf.peak_tflops("cuda:0") is None
    m = perf.metrics({"rollout": 4e12, "update": 6e12}, {"rollout": 2.0, "update": 3.0}, 100.0)
    assert m == pytest.approx(
        {
            "perf/rollout_tflops": 2.0,
            "perf/rollout_mfu": 0.02,
            "perf/update_tflops": 2.0,
            "perf/update_mfu": 0.02,
            "perf/tflops": 2.0,
            "perf/mfu": 0.02,
        }
    )
    assert perf.metrics({"eval": 1e12}, {"eval": 1.0}, None, total=False) == {"perf/eval_tflops": 1.0}
