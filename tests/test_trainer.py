"""The GRPO trainer on the digits toy through its CLI: config errors, one epoch (ZeRO-3, 1 and 2
processes, the deepspeed launcher), exact on-policy ratio, the options a FLUX user turns on, failure
handling. Resume equivalence and SIGTERM are in tests/test_wiring_runs.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
from multi_run import child_env, free_port, run_command
from safetensors.torch import load_file

from fastcps.checkpoint import ExportedWeights
from fastcps.config import ConfigError, RunConfig, load_config, validate_tree
from fastcps.train import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "digits_cps.json")
TINY = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=4",
    "train.rollout_batch_size=8",
    "train.minibatch_size=4",
    "eval.num_prompts=2",
    "eval.images_per_prompt=2",
    "eval.every=1",
    "log.progress=false",
    "checkpoint.every=0",
    f"deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}",
]


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
    cfg = load_config(
        RunConfig,
        CONFIG,
        [
            "train.prompts_per_epoch=3",
            "train.images_per_prompt=4",
            "train.rollout_batch_size=6",
            "train.minibatch_size=6",
        ],
    )
    validate_tree(cfg, world_size=2)  # 12 images, 6 per process: fine
    with pytest.raises(ConfigError, match="does not split over 5 processes"):
        validate_tree(cfg, world_size=5)
    with pytest.raises(ConfigError, match="rollout_batch_size = 6 does not divide the 4 images"):
        validate_tree(cfg, world_size=3)


def test_missing_weights_path_names_the_key(tmp_path, capsys):
    rc = main(
        ["--config", CONFIG]
        + sets(TINY + [f"output_dir={tmp_path}", "policy.pretrained=/no/such.safetensors"])
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "policy.pretrained" in err and "/no/such.safetensors" in err


# --- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_epoch_single_process_and_exact_ratio(tmp_path):
    r = run_cli(
        ["--config", CONFIG] + sets(TINY + [f"output_dir={tmp_path}", "name=one", "train.num_epochs=1"])
    )
    assert r.returncode == 0, r.stdout[-6000:]
    run = tmp_path / "one"
    rows = metrics(run)
    assert rows[0]["epoch"] == 0 and "eval/digit" in rows[0] and "eval/diversity" in rows[0]
    last = rows[-1]
    for key in (
        "reward/mean",
        "reward/digit/mean",
        "train/loss",
        "train/kl",
        "train/clipfrac",
        "train/ratio_dev",
        "train/zero_std_frac",
        "time/rollout_s",
        "time/update_s",
        "memory/peak_gib",
        "eval/digit",
    ):
        assert key in last, key
    # old_logprob = recompute: the same forward run twice gives the same numbers. That is determinism,
    # not rollout-vs-training agreement (tests/test_rollout_training_agreement.py checks that).
    assert last["train/ratio_dev"] == 0.0
    assert (run / "config.json").is_file() and (run / "reward_curve.png").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert list((run / "images").glob("eval_images_epoch0000.png"))
    final = run / "checkpoints" / "final"
    weights = ExportedWeights(final).load_all()  # transformer/: full fine-tuning's sharded export
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert (run / "checkpoints" / "latest").read_text().strip() == "final"


@pytest.mark.slow
def test_one_epoch_two_processes_zero3(tmp_path):
    launcher = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "fastcps" / "train.py"),
    ]
    r = run_cli(
        ["--config", CONFIG]
        + sets(
            TINY
            + [
                f"output_dir={tmp_path}",
                "name=two",
                "train.num_epochs=1",
                "train.prompts_per_epoch=3",
                "train.rollout_batch_size=6",
                "train.minibatch_size=3",
            ]
        ),
        launcher=launcher,
        timeout=400,
    )
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
    extra = [
        "name=lora",
        "train.num_epochs=2",
        'policy.lora={"r": 4, "alpha": 8}',
        "train.beta_kl=0.01",
        "train.ema_decay=0.9",
        "sampler.sde_window_size=2",
        "train.old_logprob=rollout",
    ]
    r = run_cli(["--config", cfg] + sets(TINY + [f"output_dir={tmp_path}"] + extra))
    assert r.returncode == 0, r.stdout[-6000:]
    rows = metrics(tmp_path / "lora")
    last = rows[-1]
    for key in (
        "reward/digit/mean",
        "reward/jpeg_compressibility/mean",
        "eval/digit",
        "eval/jpeg_compressibility",
    ):
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
    rc = main(
        ["--config", CONFIG]
        + sets(
            TINY
            + [f"output_dir={tmp_path}", "train.num_epochs=1", "eval.every=0", 'rewards=[{"name": "boom"}]']
        )
    )
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
    rc = main(
        ["--config", CONFIG]
        + sets(
            TINY
            + [
                f"output_dir={tmp_path}",
                "name=nan",
                "train.num_epochs=3",
                "eval.every=0",
                "train.max_nonfinite_steps=2",
                "train.old_logprob=rollout",
            ]
        )
    )
    assert rc == 4
    err = capsys.readouterr().err
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in err


# --- the DeepSpeed config the trainer hands to deepspeed.initialize ----------------------------------


def trainer_ds_config(tmp_path, dtype, user: dict, world: int = 2):
    """``fastcps.engine.deepspeed_config`` for ``policy.dtype=dtype`` and the user's DeepSpeed JSON ``user``
    (no model, no process group: it reads only ``cfg`` and ``world``)."""
    from fastcps.engine import deepspeed_config

    path = tmp_path / f"ds_{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(user))
    cfg = load_config(RunConfig, CONFIG, [f"policy.dtype={dtype}", f"deepspeed_config={path}"])
    return deepspeed_config(cfg, world)


def test_bf16_and_fp16_accumulate_and_reduce_gradients_in_fp32_under_zero2_and_zero3(tmp_path):
    for dtype in ("bf16", "fp16"):
        for stage in (2, 3):
            ds = trainer_ds_config(tmp_path, dtype, {"zero_optimization": {"stage": stage}})
            assert (
                ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
            )
            assert ds["bf16" if dtype == "bf16" else "fp16"] == {"enabled": True}
    # fp32 policy: already fp32; no ZeRO / ZeRO-1: DeepSpeed refuses or wraps differently, left alone
    for dtype, stage in (("fp32", 3), ("fp32", 2), ("bf16", 0), ("bf16", 1)):
        ds = trainer_ds_config(tmp_path, dtype, {"zero_optimization": {"stage": stage}})
        assert "data_types" not in ds and "communication_data_type" not in ds, (dtype, stage)
    # the user's DeepSpeed JSON wins, key by key; its other data_types keys stay
    user = {
        "zero_optimization": {"stage": 3},
        "communication_data_type": "bf16",
        "data_types": {"grad_accum_dtype": "bf16", "buffer_dtype": "fp32"},
    }
    ds = trainer_ds_config(tmp_path, "bf16", user)
    assert ds["communication_data_type"] == "bf16"
    assert ds["data_types"] == {"grad_accum_dtype": "bf16", "buffer_dtype": "fp32"}
    ds = trainer_ds_config(
        tmp_path, "bf16", {"zero_optimization": {"stage": 2}, "data_types": {"buffer_dtype": "fp32"}}
    )
    assert ds["data_types"] == {"buffer_dtype": "fp32", "grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"


@pytest.mark.slow
def test_deepspeed_honours_fp32_accumulation_of_a_bf16_model(tmp_path, monkeypatch):
    """DeepSpeed 0.19.8 (CPU accelerator, one rank) keeps a bf16 model's summed gradients in fp32 under
    ZeRO-2 and ZeRO-3 with the keys the trainer sets: 18 micro-steps of bf16 gradients then give the
    norm of their exact (fp64) sum, where a bf16 running sum is off in the 5th digit."""
    import deepspeed
    from multi_run import free_port

    torch.manual_seed(0)
    x = torch.randn(18, 4, 64).to(torch.bfloat16)
    init = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(torch.bfloat16)

    def loss_of(model, k):
        return model(x[k]).float().pow(2).mean() / len(x)

    exact = [torch.zeros_like(p, dtype=torch.float64) for p in init.parameters()]
    for k in range(len(x)):
        init.zero_grad()
        loss_of(init, k).backward()
        for a, p in zip(exact, init.parameters()):
            a += p.grad.double()
    exact_norm = float(torch.sqrt(sum((a * a).sum() for a in exact)))

    for stage in (2, 3):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        for key, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            monkeypatch.setenv(key, value)
        ds = trainer_ds_config(
            tmp_path, "bf16", {"zero_optimization": {"stage": stage, "overlap_comm": False}}, world=1
        )
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(torch.bfloat16)
        model.load_state_dict(init.state_dict())
        ds["gradient_clipping"] = 0.0
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=ds
        )
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32
        assert engine.optimizer.communication_data_type == torch.float32
        for k in range(len(x)):
            engine.set_gradient_accumulation_boundary(k == len(x) - 1)
            engine.backward(loss_of(engine, k))
        engine.step()
        norm = float(engine.get_global_grad_norm())
        assert abs(norm - exact_norm) < 1e-6 * exact_norm, (stage, norm, exact_norm)
        from conftest import destroy_process_group

        destroy_process_group()


# --- evaluation ------------------------------------------------------------------------------------


class ImageLog:
    def __init__(self):
        self.logged = []

    def images(self, tag, images, step):
        self.logged.append((tag, images.clone(), step))


def eval_trainer(policy, extra, world=1, rank=0):
    """A Trainer with what ``evaluate`` reads, around the digits toy ``policy`` (no DeepSpeed: the model
    is the bare transformer, as in one process without ZeRO)."""
    from fastcps.rewards import WeightedReward
    from fastcps.rollout import PromptEncodings, eval_prompt_set
    from fastcps.trainer import Trainer

    cfg = load_config(
        RunConfig, CONFIG, ["sampler.num_steps=4", "eval.num_prompts=5", "eval.images_per_prompt=4", *extra]
    )
    t = Trainer.__new__(Trainer)
    t.cfg, t.world, t.rank, t.device = cfg, world, rank, torch.device("cpu")
    t.policy, t.engine, t.ema, t.logger = policy, policy.transformer, None, ImageLog()
    t.encodings = PromptEncodings(policy)
    t.reward_fn = WeightedReward([(r.name, r.weight, r.args) for r in cfg.rewards])
    t.eval_prompts = list(zip(*eval_prompt_set(cfg)))
    return t


def test_batched_eval_equals_one_prompt_at_a_time(monkeypatch):
    """Several whole prompts per sampling call give the metrics and logged images of one prompt per call
    (K = 4 images, 4 per call = the old loop), to float tolerance: a wider batch may change the order
    of a matmul's reductions (fp32 on the CPU: ~1e-7 relative a forward, 4 ODE steps; measured 0 here).
    Two ranks run the same number of calls (ZeRO-3) and their sums are the one-rank sums."""
    import fastcps.distributed as fdist
    import fastcps.evaluation as evaluation_mod
    from fastcps.policies import build_policy

    calls = []
    real_sample = evaluation_mod.sample

    def counted(policy, model, cond, x1, sampling, **kw):
        calls.append(x1.shape[0])
        return real_sample(policy, model, cond, x1, sampling, **kw)

    monkeypatch.setattr(evaluation_mod, "sample", counted)
    sums = []
    monkeypatch.setattr(fdist, "all_reduce", lambda v, *a, **kw: sums.append(v.clone()) or v)
    policy = build_policy(load_config(RunConfig, CONFIG, []).policy, "cpu")

    one = eval_trainer(policy, ["train.rollout_batch_size=4", "log.images_every=1"])
    ref = one.evaluate(0)
    assert calls == [4] * 5 and set(ref) == {"eval/digit", "eval/diversity"}
    ((tag, ref_images, step),) = one.logger.logged
    assert tag == "eval/images" and step == 0 and ref_images.shape == (16, 3, 16, 16)  # the first 4 prompts
    for batch, expected_calls in ((12, [12, 8]), (32, [20]), (6, [4] * 5)):  # 3, 5, 1 prompts per call
        calls.clear()
        t = eval_trainer(policy, [f"train.rollout_batch_size={batch}", "log.images_every=1"])
        out = t.evaluate(0)
        assert calls == expected_calls, (batch, calls)
        assert out.keys() == ref.keys()
        for key in ref:
            assert abs(out[key] - ref[key]) <= 1e-6 * max(1.0, abs(ref[key])), (
                batch,
                key,
                out[key],
                ref[key],
            )
        torch.testing.assert_close(t.logger.logged[0][1], ref_images, rtol=1e-5, atol=1e-6)

    # two ranks: 5 prompts -> 3 each (rank 1 repeats prompt 4, unscored); 2 prompts per call -> 2 calls each
    sums.clear()
    calls.clear()
    per_rank_calls = []
    for rank in range(2):
        before = len(calls)
        eval_trainer(policy, ["train.rollout_batch_size=8"], world=2, rank=rank).evaluate(1)
        per_rank_calls.append(calls[before:])
    assert per_rank_calls == [[8, 4], [8, 4]]
    sums.clear()
    eval_trainer(policy, ["train.rollout_batch_size=4"]).evaluate(1)
    whole = sums.pop()
    sums.clear()
    for rank in range(2):
        eval_trainer(policy, ["train.rollout_batch_size=8"], world=2, rank=rank).evaluate(1)
    torch.testing.assert_close(sums[0] + sums[1], whole, rtol=1e-6, atol=1e-9)
    assert sums[0][-2:].tolist() == [3, 12] and sums[1][-2:].tolist() == [2, 8]  # prompts, images per rank


def test_eval_encodes_its_prompts_before_it_gathers_the_model(monkeypatch):
    """Trainer.evaluate encodes every eval prompt of its rank before the whole-model gather
    (whole_model_sampling under ZeRO-3): the text encoders, which policy.offload_frozen brings to the GPU
    to encode, never share it with the gathered transformer; inside the gather only sampling runs. The
    metrics are those of encoding chunk by chunk (test_batched_eval_equals_one_prompt_at_a_time)."""
    import contextlib

    from fastcps.policies import build_policy

    policy = build_policy(load_config(RunConfig, CONFIG, []).policy, "cpu")
    events = []

    class Recorded(torch.nn.Module):
        """The engine: forwards to the transformer; its whole-model gather recorded
        (fastcps.rollout.whole_model takes a model's own ``whole_model``, as the plan's stand-in does)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            events.append("forward")
            return self.inner(*args, **kwargs)

        @contextlib.contextmanager
        def whole_model(self):
            events.append("gather")
            yield
            events.append("release")

    real_encode = policy.encode
    monkeypatch.setattr(
        policy, "encode", lambda prompts, meta=None: events.append("encode") or real_encode(prompts, meta)
    )
    t = eval_trainer(policy, ["whole_model_sampling=true", "train.rollout_batch_size=4"])
    t.engine = Recorded(policy.transformer)
    t.evaluate(0)
    assert events.count("gather") == 1 and "encode" in events and "forward" in events
    gathered = events[events.index("gather") : events.index("release") + 1]
    assert "encode" not in gathered and set(gathered) == {"gather", "forward", "release"}, events
    assert events.index("encode") < events.index("gather")
