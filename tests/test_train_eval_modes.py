"""The trained module's mode in each phase, observed from inside its forward (a hook on its first block
reads ``self.training``): sampling (the rollout, ``rollout.sample`` as ``fastcps.sample`` and the analyses
call it, ``Trainer.evaluate``) in eval mode as the stock pipelines and flow_grpo sample
(``pipeline.transformer.eval()``); the update's forwards (training, old-log-prob recompute, the KL
reference of a LoRA policy, which is the same module with its adapters off) in train mode as flow_grpo's
(``pipeline.transformer.train()``). LoRA dropout, which would make the two differ, is a config error."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import fastcps.rollout as rollout_mod
import fastcps.update as update_mod
from fastcps.config import ConfigError, LoraConfig, PolicyConfig, RunConfig, load_config
from fastcps.policies import build_policy
from fastcps.update import epoch_advantages
from wiring_support import FlagOptimizer, RecordingEngine, toy_config, toy_rollout

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# 4 samples, rollout batches of 2 (two sampling calls), minibatches of 1 (not the rollout's layout: the
# later windows' old log-probs are recomputed), an SDE window of 2 trained steps, the KL term on.
SETS = [
    "sampler.num_steps=4",
    "sampler.sde_window_size=2",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=2",
    "train.rollout_batch_size=2",
    "train.minibatch_size=1",
    "train.gradient_accumulation_steps=2",
    "train.beta_kl=0.1",
]


class ModeLog:
    """Every forward of ``module``'s first block (and of the reference's, when it is another module):
    (phase, self.training, grad enabled)."""

    def __init__(self, *modules):
        self.phase, self.seen = None, []
        for m in modules:
            blocks = m.transformer_blocks
            blocks[0].register_forward_pre_hook(
                lambda mod, args: self.seen.append((self.phase, mod.training, torch.is_grad_enabled()))
            )

    def modes(self, phase: str) -> set[bool]:
        return {training for p, training, _ in self.seen if p == phase}


def count_switches(monkeypatch, module) -> list[bool]:
    """The modes ``module.train`` is called with (every switch walks all submodules)."""
    calls, real = [], module.train
    monkeypatch.setattr(module, "train", lambda mode=True: (calls.append(mode), real(mode))[1])
    return calls


def tiny_flux(tmp_path_factory):
    from fastcps.testing import save_tiny_flux

    path = save_tiny_flux(tmp_path_factory.mktemp("flux") / "flux")
    cfg = PolicyConfig(
        name="flux",
        pretrained=str(path),
        dtype="fp32",
        resolution=64,
        max_sequence_length=32,
        guidance=3.5,
        lora=LoraConfig(r=4, alpha=8.0),
    )
    return build_policy(cfg, "cpu")


@pytest.fixture(params=["toy", "toy_lora", "flux_lora"])
def policy(request, tmp_path_factory):
    if request.param == "flux_lora":
        return tiny_flux(tmp_path_factory)
    lora = ['policy.lora={"r": 4, "alpha": 8.0}'] if request.param == "toy_lora" else []
    return build_policy(toy_config(lora).policy, "cpu")


def test_rollout_samples_in_eval_mode_and_the_update_trains_in_train_mode(policy, monkeypatch):
    cfg = toy_config(SETS)
    model = policy.transformer
    assert model.training  # as the policies build it
    # the toy's full fine-tuning has its own frozen reference copy; a LoRA policy's is the model itself
    other = [] if policy.lora else [policy._reference]
    log = ModeLog(model, *other)

    switches = count_switches(monkeypatch, model)
    log.phase = "rollout"
    data = toy_rollout(cfg, policy, 0)
    assert log.modes("rollout") == {False} and len(log.seen) == 2 * 4  # two batches x 4 steps
    assert switches == [False, True] and model.training  # once for the epoch, then back

    real_reference = policy.reference

    @contextlib.contextmanager
    def reference(m):
        log.phase = "reference"
        with real_reference(m) as ref:
            yield ref
        log.phase = "update"

    monkeypatch.setattr(policy, "reference", reference)
    model.eval()  # however the update finds it (here: left in eval mode), it trains in train mode
    log.phase = "update"
    adv = epoch_advantages(data, cfg.train, torch.device("cpu")).local
    opt = FlagOptimizer()
    update_mod.run_update(RecordingEngine(model, opt), opt, policy, data, adv, cfg.train, epoch=0, seed=0)
    update = [(training, grad) for p, training, grad in log.seen if p == "update"]
    assert {training for training, _ in update} == {True}
    assert {grad for _, grad in update} == {True, False}  # the training forwards and the recompute's
    assert log.modes("reference") == ({True} if policy.lora else {False})  # LoRA: flow_grpo's, adapters off


def test_sample_switches_to_eval_mode_and_back(monkeypatch):
    """``rollout.sample`` alone, as ``fastcps.sample`` and ``Trainer.evaluate`` call it."""
    cfg = toy_config(["sampler.num_steps=4"])
    policy = build_policy(cfg.policy, "cpu")
    log = ModeLog(policy.transformer)
    steps = rollout_mod.sampling_steps("ode", None, policy.sigmas(4, device="cpu"))
    x1 = torch.randn(2, *policy.latent_shape())
    log.phase = "sample"
    rollout_mod.sample(policy, policy.transformer, policy.encode(["a handwritten digit two"] * 2), x1, steps)
    assert log.modes("sample") == {False} and policy.transformer.training


def test_trainer_evaluate_samples_in_eval_mode_switching_once(tmp_path, monkeypatch):
    """Two sampling calls (4 prompts x 4 images, 8 per call), one switch to eval mode and one back."""
    import deepspeed

    from fastcps.config import validate_tree
    from fastcps.rewards import REGISTRY
    from fastcps.trainer import Trainer
    from wiring_support import plain_initialize

    monkeypatch.setattr(deepspeed, "initialize", plain_initialize)
    monkeypatch.setitem(REGISTRY, "brightness", "wiring_support:Brightness")
    cfg = load_config(
        RunConfig,
        str(ROOT / "configs" / "digits_cps.json"),
        [
            "sampler.num_steps=4",
            "eval.num_steps=4",
            "eval.num_prompts=4",
            "eval.images_per_prompt=4",
            "train.rollout_batch_size=8",
            "log.tensorboard=false",
            "log.images_every=0",
            'rewards=[{"name": "brightness"}]',
        ],
    )
    validate_tree(cfg, world_size=1)
    t = Trainer(cfg, tmp_path / "run")
    model = t.engine.module
    log = ModeLog(model)
    switches = count_switches(monkeypatch, model)
    log.phase = "eval"
    t.evaluate(0)
    assert log.modes("eval") == {False} and len(log.seen) == 2 * 4
    assert switches == [False, True] and model.training


def test_lora_dropout_is_a_config_error_that_says_why():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, str(ROOT / "configs" / "flux_pickscore.json"), ["policy.lora.dropout=0.05"])
    msg = str(err.value)
    assert "policy.lora.dropout" in msg and "ratio" in msg and "Set policy.lora.dropout to 0" in msg
    policy = build_policy(toy_config().policy, "cpu")
    with pytest.raises(ValueError, match="policy.lora.dropout"):
        policy.add_lora(4, 8.0, dropout=0.1)
