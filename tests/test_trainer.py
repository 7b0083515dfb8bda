"""The GRPO trainer on the digits toy through its CLI: config errors, one epoch (ZeRO-3, 1 and 2
processes, the deepspeed launcher), exact on-policy ratio, the options a FLUX user turns on, failure
handling. Resume equivalence and SIGTERM are in tests/test_wiring_runs.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastcps.config import RunConfig
from fastcps.configlib import ConfigError, load_config, validate_tree
from fastcps.train import main
from multi_run import child_env, free_port, run_command

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "digits_cps.json")
TINY = ["sampler.num_steps=4", "train.prompts_per_epoch=2", "train.images_per_prompt=4",
        "train.rollout_batch_size=8", "train.minibatch_size=4", "eval.num_prompts=2",
        "eval.images_per_prompt=2", "eval.every=1", "log.progress=false", "checkpoint.every=0",
        f"deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}"]


def sets(items):
    return [a for kv in items for a in ("--set", kv)]


def run_cli(args, env_extra=None, launcher=None, timeout=300):
    """The CLI (or a launcher) to its end; its output is in ``stdout`` (stderr merged)."""
    cmd = (launcher or [sys.executable, "-m", "fastcps.train"]) + args
    return run_command(cmd, child_env(**(env_extra or {})), timeout)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- config errors, before any model loads ----------------------------------------------------------

def test_unknown_key_and_wrong_type_are_named(capsys):
    assert main(["--config", CONFIG, "--set", "train.lrr=1e-4"]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert main(["--config", CONFIG, "--set", "train.images_per_prompt=four"]) == 2
    assert "train.images_per_prompt" in capsys.readouterr().err
    assert main(["--config", CONFIG, "--set", "sampler.name=euler"]) == 2
    assert "sampler.name" in capsys.readouterr().err


def test_batch_arithmetic_depends_on_world_size():
    cfg = load_config(RunConfig, CONFIG, ["train.prompts_per_epoch=3", "train.images_per_prompt=4",
                                          "train.rollout_batch_size=6", "train.minibatch_size=6"])
    validate_tree(cfg, world_size=2)  # 12 images, 6 per process: fine
    with pytest.raises(ConfigError, match="does not split over 5 processes"):
        validate_tree(cfg, world_size=5)
    with pytest.raises(ConfigError, match="rollout_batch_size = 6 does not divide the 4 images"):
        validate_tree(cfg, world_size=3)


def test_missing_weights_path_names_the_key(tmp_path, capsys):
    rc = main(["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", "policy.pretrained=/no/such.safetensors"]))
    assert rc == 2
    err = capsys.readouterr().err
    assert "policy.pretrained" in err and "/no/such.safetensors" in err


# --- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_epoch_single_process_and_exact_ratio(tmp_path):
    r = run_cli(["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", "name=one", "train.num_epochs=1"]))
    assert r.returncode == 0, r.stdout[-6000:]
    run = tmp_path / "one"
    rows = metrics(run)
    assert rows[0]["epoch"] == 0 and "eval/digit" in rows[0] and "eval/diversity" in rows[0]
    last = rows[-1]
    for key in ("reward/mean", "reward/digit/mean", "train/loss", "train/kl", "train/clipfrac", "train/ratio_dev",
                "train/zero_std_frac", "time/rollout_s", "time/update_s", "memory/peak_gib", "eval/digit"):
        assert key in last, key
    # old_logprob = recompute: the same forward run twice gives the same numbers. That is determinism,
    # not rollout-vs-training agreement (tests/test_rollout_training_agreement.py checks that).
    assert last["train/ratio_dev"] == 0.0
    assert (run / "config.json").is_file() and (run / "reward_curve.png").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert list((run / "images").glob("eval_images_epoch0000.png"))
    final = run / "checkpoints" / "final"
    weights = load_file(str(final / "policy.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert (run / "checkpoints" / "latest").read_text().strip() == "final"


@pytest.mark.slow
def test_one_epoch_two_processes_zero3(tmp_path):
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "fastcps" / "train.py")]
    r = run_cli(["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", "name=two", "train.num_epochs=1",
                                                    "train.prompts_per_epoch=3", "train.rollout_batch_size=6",
                                                    "train.minibatch_size=3"]),
                launcher=launcher, timeout=400)
    assert r.returncode == 0, r.stdout[-8000:]
    rows = metrics(tmp_path / "two")
    assert rows[-1]["train/ratio_dev"] == 0.0 and "eval/digit" in rows[-1]  # recompute: determinism only
    ckpt = tmp_path / "two" / "checkpoints" / "final"
    assert len(list(ckpt.glob("*zero_pp_rank_1_*"))) >= 1  # rank 1 held its own ZeRO-3 partition


@pytest.mark.slow
def test_lora_multi_reward_ema_kl_window_rollout_logprobs(tmp_path):
    """One run through the options a FLUX user turns on: LoRA (peft) with the reference = adapters
    off, beta_kl > 0, EMA for eval, an SDE window, old log-probs from the rollout, weighted rewards."""
    cfg = str(ROOT / "configs" / "digits_multi.json")
    extra = ["name=lora", "train.num_epochs=2", "policy.lora={\"r\": 4, \"alpha\": 8}", "train.beta_kl=0.01",
             "train.ema_decay=0.9", "sampler.sde_window_size=2", "train.old_logprob=rollout"]
    r = run_cli(["--config", cfg] + sets(TINY + [f"output_dir={tmp_path}"] + extra))
    assert r.returncode == 0, r.stdout[-6000:]
    rows = metrics(tmp_path / "lora")
    last = rows[-1]
    for key in ("reward/digit/mean", "reward/jpeg_compressibility/mean", "eval/digit", "eval/jpeg_compressibility"):
        assert key in last, key
    assert last["train/trained_steps"] <= 2  # only the window's steps are stochastic and trained
    assert last["train/kl"] > 0  # adapters moved the policy away from the reference
    # old log-probs from the rollout (batch 8) vs the training forward (batch 4), fp32: a wrong step
    # index would move the ratio by 1e-2 or more (tests/test_rollout_training_agreement.py has the bounds)
    assert 0 <= last["train/ratio_dev"] < 1e-5
    final = tmp_path / "lora" / "checkpoints" / "final"
    lora = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k and ".default" not in k for k in lora)
    assert any(float(t.abs().max()) > 0 for k, t in lora.items() if "lora_B" in k)  # trained
    assert (final / "ema_rank0.pt").is_file()


class BoomReward:
    name = "boom"

    def __call__(self, images, prompts, metadata):
        raise RuntimeError("scorer server unreachable")


def test_a_reward_that_raises_stops_the_run_and_names_it(tmp_path, capsys, monkeypatch):
    from fastcps import rewards

    monkeypatch.setitem(rewards.REGISTRY, "boom", "test_trainer:BoomReward")  # removed after the test
    rc = main(["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", "train.num_epochs=1", "eval.every=0",
                                                  'rewards=[{"name": "boom"}]']))
    assert rc == 3
    err = capsys.readouterr().err
    assert "reward 'boom' raised RuntimeError: scorer server unreachable" in err


def test_non_finite_loss_skips_steps_then_stops(tmp_path, monkeypatch, capsys):
    import fastcps.update as update_mod
    from fastcps.ops.cps_logprob_kl import LogprobKL

    real = update_mod.cps_logprob_kl

    def nan_logprob(*args, **kwargs):
        out = real(*args, **kwargs)
        return LogprobKL(out.log_prob * float("nan"), out.kl)

    monkeypatch.setattr(update_mod, "cps_logprob_kl", nan_logprob)
    rc = main(["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", "name=nan", "train.num_epochs=3",
                                                  "eval.every=0", "train.max_nonfinite_steps=2",
                                                  "train.old_logprob=rollout"]))
    assert rc == 4
    err = capsys.readouterr().err
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in err
