"""The trainer's wiring, in one process (issue 9, part 3). Each piece has tests of its own elsewhere;
these fail when the pieces are connected wrongly: an advantage with the wrong sign or config, a pass
that reuses the last minibatch order, a reward weight that does not reach the total, an EMA that
averages the wrong weights or is not what eval samples with, a checkpoint rotation off by one, a plan
that trains a step without noise.

The trainer runs here with ``PlainEngine`` in place of DeepSpeed's engine (``deepspeed.initialize`` is
monkeypatched): the same ``Trainer``, rollout and update code, no process group, ~1 s an epoch. The
multi-process wiring (ranks, resume, SIGTERM) is in tests/test_wiring_runs.py.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import isolated_global_state
from wiring_support import advantages_by_hand, plain_initialize

import fastcps.evaluation as evaluation_mod
import fastcps.trainer as trainer_mod
import fastcps.update as update_mod
from fastcps.checkpoint import ExportedWeights
from fastcps.config import RunConfig, load_config, validate_tree
from fastcps.rewards import REGISTRY
from fastcps.rollout import epoch_steps, sampling_steps, window_start
from fastcps.samplers import SAMPLERS, step_coeffs
from fastcps.update import epoch_advantages

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "digits_cps.json")
# 2 prompts x 4 images, 4 steps (3 trained: CPS's last step has no noise), minibatch 4: two optimizer
# steps an epoch. Eval: 2 prompts x 4 images on fixed noise (ODE).
SMALL = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=4",
    "train.rollout_batch_size=8",
    "train.minibatch_size=4",
    "eval.num_prompts=2",
    "eval.images_per_prompt=4",
    "eval.every=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.images_every=0",
    "checkpoint.every=0",
    'rewards=[{"name": "brightness"}]',
]


def make_trainer(run_dir: Path, *sets: str):
    cfg = load_config(RunConfig, CONFIG, SMALL + list(sets))
    validate_tree(cfg, world_size=1)
    return trainer_mod.Trainer(cfg, run_dir)


def plain_trainer_env(mp: pytest.MonkeyPatch) -> None:
    """DeepSpeed's engine replaced by ``PlainEngine``; the test rewards registered (removed after)."""
    import deepspeed

    mp.setattr(deepspeed, "initialize", plain_initialize)
    mp.setitem(REGISTRY, "brightness", "wiring_support:Brightness")
    mp.setitem(REGISTRY, "darkness", "wiring_support:Darkness")


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    plain_trainer_env(monkeypatch)
    return lambda *sets: make_trainer(tmp_path / "run", *sets)


def record_calls(monkeypatch, module, name, *, when=lambda *a, **k: True):
    """Wrap ``module.name``; returns the list of (args, kwargs, result) of its calls."""
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args, **kwargs):
            calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


# --- direction -------------------------------------------------------------------------------------
# Reward = mean brightness; the change of eval brightness (fixed eval noise, ODE) over 4 epochs at lr
# 1e-4, measured for seeds 0-4: cps +0.101..+0.137 with the advantage as is, -0.090..-0.126 negated;
# flow_sde +0.060..+0.123 and -0.055..-0.120. The bound 0.02 leaves a margin of 2.7x or more (seed 0 runs
# here: cps +0.123/-0.108, flow_sde +0.073/-0.065). Advantages paired with the wrong samples move it by
# |0.003|..|0.078| depending on the seed (by 0.003..0.011 at seed 0): the rank test catches those exactly.
DIRECTION_EPOCHS, DIRECTION_MIN = 4, 0.02


@pytest.mark.parametrize("sampler", ["cps", "flow_sde"])
def test_training_moves_the_reward_the_right_way_and_negation_reverses_it(trainer, monkeypatch, sampler):
    real = trainer_mod.epoch_advantages

    def brightness_change(sign: int) -> float:
        def signed_advantages(*args, **kwargs):
            out = real(*args, **kwargs)
            return out._replace(local=sign * out.local)

        monkeypatch.setattr(trainer_mod, "epoch_advantages", signed_advantages)
        t = trainer(f"sampler.name={sampler}", "train.lr=1e-4", "train.minibatch_size=8")
        before = t.evaluate(0)["eval/brightness"]
        for epoch in range(DIRECTION_EPOCHS):
            t.run_epoch(epoch)
        return t.evaluate(DIRECTION_EPOCHS)["eval/brightness"] - before

    up, down = brightness_change(+1), brightness_change(-1)
    assert up > DIRECTION_MIN and down < -DIRECTION_MIN, (
        f"{sampler}: brightness {up:+.4f} (advantage), {down:+.4f} (negated)"
    )


# --- the update loop ---------------------------------------------------------------------------------


def test_two_inner_epochs_are_two_passes_in_fresh_orders(trainer, monkeypatch):
    """Each pass feeds every (sample, trained step) once, in its own minibatch order; the old
    log-probs stay those of the rollout policy in the second pass (not recomputed after updates). The
    first window's micro-steps get None: their own forward's log-prob is the old one."""
    fed = record_calls(
        monkeypatch, update_mod, "micro_step_loss", when=lambda *a, **k: torch.is_grad_enabled()
    )
    t = trainer("train.num_inner_epochs=2", "train.minibatch_size=2", "train.gradient_accumulation_steps=2")
    steps = record_calls(monkeypatch, t, "_after_optimizer_step")
    t.run_epoch(0)
    n, J, per_pass = 8, 3, 4 * 3  # 4 minibatches of 2 a pass, each through the 3 trained steps
    assert len(fed) == 2 * per_pass and len(steps) == 2 * 2  # 2 minibatches per optimizer step
    orders, old = [], [{}, {}]
    for p, calls in enumerate((fed[:per_pass], fed[per_pass:])):
        assert [args[4] for args, _, _ in calls] == list(range(J)) * 4
        order = [i for args, _, _ in calls[::J] for i in args[3].tolist()]
        assert sorted(order) == list(range(n))
        for k, ((_, _, _, mb, j, old_logp, _), _, (_, logp)) in enumerate(calls):
            assert (old_logp is None) == (p == 0 and k < 2 * J), (p, k)  # the first window: 2 minibatches
            old[p].update(
                {(int(i), j): float(v) for i, v in zip(mb, logp.detach() if old_logp is None else old_logp)}
            )
        orders.append(order)
    assert orders[0] != orders[1], f"both passes in order {orders[0]}"
    assert old[0] == old[1]


@pytest.mark.parametrize("std", ["prompt", "global"])
def test_epoch_advantages_follow_the_config(std, monkeypatch):
    """``train.adv_std`` / ``adv_clip_max`` reach the advantages (numbers by hand, numpy)."""
    rewards = np.array([0.0, 1.0, 4.0, 2.0, 3.0, 9.0, 5.0, 7.0])
    groups = np.array([1, 0, 1, 0, 0, 1, 0, 1])
    monkeypatch.setitem(
        REGISTRY, "brightness", "wiring_support:Brightness"
    )  # SMALL's reward: names are checked
    cfg = load_config(RunConfig, CONFIG, SMALL + [f"train.adv_std={std}", "train.adv_clip_max=1.3"])
    data = type(
        "Data", (), {"reward": torch.tensor(rewards, dtype=torch.float32), "group": torch.tensor(groups)}
    )
    out = epoch_advantages(data, cfg.train, torch.device("cpu"))
    expected = advantages_by_hand(rewards, groups, std=std, clip=1.3)
    assert (np.abs(expected) == 1.3).any() and (np.abs(expected) < 1.3).any()  # the clip matters here
    np.testing.assert_allclose(out.local.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_weighted_rewards_sum_into_the_advantages(trainer, monkeypatch):
    """Two rewards with weights 2 and -0.5: the rollout's total is the weighted sum of the components
    (darkness = 1 - brightness, so both are known), the advantages are computed from that total, and
    the metrics report each component unweighted."""
    seen = record_calls(monkeypatch, trainer_mod, "epoch_advantages")
    t = trainer('rewards=[{"name": "brightness", "weight": 2.0}, {"name": "darkness", "weight": -0.5}]')
    metrics = t.run_epoch(0)
    (data, *_), _, adv = seen[0]
    b, d = data.components["brightness"], data.components["darkness"]
    torch.testing.assert_close(d, 1 - b)
    torch.testing.assert_close(data.reward, 2.0 * b - 0.5 * d)
    assert float(data.reward.std()) > 0
    np.testing.assert_allclose(adv.local.numpy(), advantages_by_hand(data.reward, data.group), rtol=1e-5)
    assert metrics["reward/mean"] == pytest.approx(float(data.reward.mean()))
    assert metrics["reward/brightness/mean"] == pytest.approx(float(b.mean()))
    assert metrics["reward/darkness/mean"] == pytest.approx(float(d.mean()))


# --- EMA, eval, checkpoints: one fit() ----------------------------------------------------------------
EMA_DECAY, FIT_EPOCHS, KEEP = 0.7, 4, 2  # 0.7: a decay swapped with 1 - decay shows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """fit() over 4 epochs (2 optimizer steps each, the third epoch's first step skipped for a
    non-finite loss), EMA decay 0.7, eval every 2 epochs, a checkpoint every epoch keeping 2. Records
    the trained weights at each optimizer step's bookkeeping, and the weights eval samples with."""
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    with pytest.MonkeyPatch.context() as mp:
        plain_trainer_env(mp)
        t = make_trainer(
            run_dir,
            f"train.num_epochs={FIT_EPOCHS}",
            f"train.ema_decay={EMA_DECAY}",
            "eval.every=2",
            "checkpoint.every=1",
            f"checkpoint.keep={KEEP}",
        )
        weights = lambda: [p.detach().clone() for p in t.ema.params]  # noqa: E731
        start, after_steps, at_eval = weights(), [], []
        real_after, real_sample, real_loss = (
            t._after_optimizer_step,
            evaluation_mod.sample,
            update_mod.cps_logprob_kl,
        )
        calls = {"loss": 0}

        def after(epoch, skipped):
            after_steps.append((skipped, weights()))
            real_after(epoch, skipped)

        def sample(*args, **kwargs):
            at_eval.append((weights(), [s.clone() for s in t.ema.shadow]))
            return real_sample(*args, **kwargs)

        def loss(
            *args, **kwargs
        ):  # training micro-steps 13..15 (the third epoch's first window: 1 minibatch x 3 steps): NaN
            calls["loss"] += torch.is_grad_enabled()
            out = real_loss(*args, **kwargs)
            training = (
                torch.is_grad_enabled()
            )  # not the no-grad recompute, which runs before the window's step
            return (
                out._replace(log_prob=out.log_prob * float("nan"))
                if training and 13 <= calls["loss"] <= 15
                else out
            )

        mp.setattr(t, "_after_optimizer_step", after)
        mp.setattr(evaluation_mod, "sample", sample)
        mp.setattr(update_mod, "cps_logprob_kl", loss)
        t.fit()
    return {"trainer": t, "start": start, "steps": after_steps, "eval": at_eval, "run_dir": run_dir}


def test_ema_is_the_closed_form_average_of_the_applied_steps(fitted):
    """shadow_k = d^k θ_0 + (1 - d) Σ_i d^(k-i) θ_i over the k applied optimizer steps (a skipped
    step neither changes θ nor counts), in float64."""
    steps = fitted["steps"]
    assert [s for s, _ in steps] == [False] * 4 + [True] + [False] * 3
    applied = [w for skipped, w in steps if not skipped]
    k, d = len(applied), EMA_DECAY
    for n, shadow in enumerate(fitted["trainer"].ema.shadow):
        expected = d**k * fitted["start"][n].double()
        expected += sum((1 - d) * d ** (k - i) * applied[i - 1][n].double() for i in range(1, k + 1))
        torch.testing.assert_close(shadow.double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(
        applied[-1][0], fitted["trainer"].ema.shadow[0]
    )  # the average is not the last step
    saved = torch.load(fitted["run_dir"] / "checkpoints" / "final" / "ema_rank0.pt")
    for a, b in zip(saved["shadow"], fitted["trainer"].ema.shadow):
        assert torch.equal(a, b)


def test_eval_samples_with_the_ema_weights_and_restores_the_trained_ones(fitted):
    evals = fitted["eval"]
    assert (
        len(evals) == 3
    )  # epochs 0, 2, 4; one ODE sampling call each: 2 prompts x 4 images <= rollout_batch_size 8
    for w, shadow in evals:
        for a, b in zip(w, shadow):
            assert torch.equal(a, b)
    trained = [p.detach() for p in fitted["trainer"].ema.params]
    assert torch.equal(trained[0], fitted["steps"][-1][1][0])  # restored after the last eval
    assert not torch.equal(evals[-1][0][0], trained[0])


def test_checkpoint_rotation_keeps_the_newest_periodic_ones_and_final(fitted):
    root = fitted["run_dir"] / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch00002", "epoch00003", "final"]
    assert (root / "latest").read_text().strip() == "final"
    weights = ExportedWeights(root / "final").load_all()  # full fine-tuning: the whole state dict
    trained = dict(fitted["trainer"].engine.module.named_parameters())
    assert weights.keys() == set(fitted["trainer"].engine.module.state_dict())
    assert {n for n, p in trained.items() if p.requires_grad} <= weights.keys()
    for name, w in weights.items():
        assert torch.equal(w, trained[name].detach())


@pytest.mark.parametrize(
    "stop_in, tag, next_epoch",
    [("rollout", "interrupted_epoch00001", 1), ("update", "interrupted_epoch00002", 2)],
)
def test_an_interrupt_leaves_a_checkpoint_an_uninterrupted_run_passes_through(
    trainer, monkeypatch, stop_in, tag, next_epoch
):
    """A stop (SIGTERM's flag) in the second epoch's rollout: nothing changed, the checkpoint says "run
    epoch 1 again". A stop during its update: the update runs to its end (both optimizer steps), the
    checkpoint says "go on with epoch 2". Either is a state the uninterrupted run passes through."""
    t = trainer("train.num_epochs=3")  # 2 optimizer steps an epoch
    real_rollout, real_after = trainer_mod.rollout_epoch, t._after_optimizer_step
    steps = []

    def rollout(cfg, epoch, *args, **kwargs):
        t.stop.requested = t.stop.requested or (stop_in == "rollout" and epoch == 1)
        return real_rollout(cfg, epoch, *args, **kwargs)

    def after(epoch, skipped):
        real_after(epoch, skipped)
        steps.append(epoch)
        t.stop.requested = t.stop.requested or (stop_in == "update" and epoch == 1)

    monkeypatch.setattr(trainer_mod, "rollout_epoch", rollout)
    monkeypatch.setattr(t, "_after_optimizer_step", after)
    t.fit()
    root = t.run_dir / "checkpoints"
    assert (root / "latest").read_text() == tag
    saved = torch.load(root / tag / "state.pt", weights_only=False)
    assert saved["client"]["trainer"]["epoch"] == next_epoch
    assert steps == ([0, 0] if stop_in == "rollout" else [0, 0, 1, 1])


# --- the sampling steps: which are stochastic, which are trained -----------------------------------


def toy_sigmas(n: int) -> torch.Tensor:
    return torch.cat([torch.linspace(1, 1 / n, n), torch.zeros(1)])


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_steps_without_noise_are_never_trained(sampler):
    sigmas = toy_sigmas(6)
    window = dict(window_size=2, window_start=1) if sampler == "cpws" else {}  # cpws cannot reach σ' = 0
    sampling = sampling_steps(sampler, None, sigmas, **window)
    noisy = [
        i
        for i in range(6)
        if sampling.stochastic[i]
        and float(step_coeffs(sampler, sigmas[i], sigmas[i + 1], sigma_max=sigmas[1]).s[0]) > 0
    ]
    assert sampling.trained == noisy
    if sampler in ("cps", "dpmpp1_sde"):  # their last step (σ' = 0) injects no noise
        assert sampling.trained == list(range(5))
    if sampler == "ode":
        assert sampling.trained == []


@pytest.mark.parametrize("fraction, k", [(0.01, 1), (0.25, 2), (0.5, 3), (0.7, 4), (1.0, 5)])
def test_timestep_fraction_trains_the_first_noisy_steps(fraction, k):
    """ceil(fraction x 5 noisy CPS steps), at least one, the first ones."""
    sampling = sampling_steps("cps", 0.8, toy_sigmas(6), timestep_fraction=fraction)
    assert sampling.trained == list(range(k))


def test_window_places_the_stochastic_steps_and_ode_elsewhere():
    sigmas = toy_sigmas(6)
    sampling = sampling_steps("flow_sde", None, sigmas, window_size=3, window_start=2)
    assert sampling.stochastic == [False, False, True, True, True, False] and sampling.trained == [2, 3, 4]
    for i in (0, 1, 5):
        ode = step_coeffs("ode", sigmas[i], sigmas[i + 1])
        assert all(torch.equal(a, b) for a, b in zip(sampling.coeffs[i], ode))
    assert sampling_steps("cps", 0.8, sigmas, window_size=2, window_start=4).trained == [4]  # step 5: σ' = 0
    with pytest.raises(ValueError, match=r"sde window \[4, 7\) does not fit 6 steps"):
        sampling_steps("cps", 0.8, sigmas, window_size=3, window_start=4)


@pytest.mark.parametrize("window_range, starts", [(None, {0, 1, 2, 3, 4}), ([1, 3], {1, 2})])
def test_epoch_plan_draws_the_window_from_its_range(window_range, starts):
    """Over 100 epochs the window's first step takes every value of [lo, hi) and no other (default
    range: every start where the 2-step window fits in 6 steps); epoch_steps puts it there and applies
    timestep_fraction inside it."""
    sets = ["sampler.num_steps=6", "sampler.sde_window_size=2", "sampler.timestep_fraction=0.5"]
    sets += [f"sampler.sde_window_range={window_range}"] if window_range else []
    cfg = load_config(RunConfig, CONFIG, sets)
    assert {window_start(cfg, e) for e in range(100)} == starts
    other_run = load_config(RunConfig, CONFIG, sets + ["seed=1"])  # the run seed draws too
    assert [window_start(other_run, e) for e in range(20)] != [window_start(cfg, e) for e in range(20)]
    policy = type("Policy", (), {"sigmas": lambda self, n, device=None: toy_sigmas(n)})()
    for epoch in range(6):
        w = window_start(cfg, epoch)
        sampling = epoch_steps(cfg, epoch, policy)
        assert [i for i, s in enumerate(sampling.stochastic) if s] == [w, w + 1]
        assert sampling.trained == [w]  # ceil(0.5 x 2 noisy steps), or of the 1 left when w + 1 is the last


# --- test hygiene --------------------------------------------------------------------------------------


def test_global_state_is_put_back_after_a_test(tmp_path):
    """What conftest's autouse fixture undoes: an environment variable, a registered reward, a process
    group started in the test."""
    import os

    from multi_run import free_port

    with isolated_global_state():
        os.environ["FASTCPS_WIRING_PROBE"] = "1"
        REGISTRY["wiring_probe"] = "wiring_support:Brightness"
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    assert "FASTCPS_WIRING_PROBE" not in os.environ and "wiring_probe" not in REGISTRY
    assert not torch.distributed.is_initialized()
