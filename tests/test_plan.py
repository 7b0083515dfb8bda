"""``python -m fastcps.plan`` and its measurements (``fastcps.plan.measure``): the memory tracker against
known
tensor sizes, FLOPs against a hand count and FlopCounterMode, fake-tensor measurements against the same
measurement on real CPU tensors, the epoch arithmetic, the JSON, ``--gpu-mem`` and the exit codes.
Tiny transformer configs keep these fast; the model families' plans are tests/test_plan_families.py,
the recipes' goals at full size tests/test_plan_goals.py."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastcps.config import RunConfig, load_config
from fastcps.plan import Loader, main, plan, policy_sigmas
from fastcps.plan.measure import LiveBytes, TransformerMeter
from fastcps.trainer import evaluate_with
from plan_support import FLUX_CFG, LORA, ROOT, TINY_FLUX, run_json


@pytest.fixture
def tiny_flux(tmp_path):
    path = tmp_path / "tiny_flux.json"
    path.write_text(json.dumps(TINY_FLUX))
    return path


def test_live_bytes_counts_storages_once_and_frees_them():
    keep = torch.zeros(1000)
    with LiveBytes(exclude=[keep]) as live:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        view = a[::2].view(-1)  # a view: the same storage, not counted again
        b = torch.empty(500, dtype=torch.bfloat16)  # 1000 bytes
        assert live.current == 5000
        _ = keep[:10] + 0  # a view of an excluded storage is not counted; the sum's 40 bytes are
        assert live.current == 5040
        del a, view, b, _
        assert live.current == 0
    assert live.peak == 5040


def test_flops_match_a_hand_count_and_flop_counter_mode():
    b, s, h, d, k = 2, 16, 2, 8, 24
    lin = torch.nn.Linear(k, h * d)
    x = torch.randn(b, s, k, requires_grad=True)

    def step():
        q = lin(x).view(b, s, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, q, q)
        return out.sum()

    with LiveBytes() as live:
        loss = step()
        live.phase = "backward"
        loss.backward()
    linear = 2 * (b * s) * k * (h * d)  # 2·m·n·k
    attention = 2 * (2 * b * h * s * s * d)  # Q·Kᵀ and P·V
    assert live.flops["forward"] == linear + attention
    with FlopCounterMode(display=False) as fc:
        step().backward()
    assert live.flops["forward"] + live.flops["backward"] == fc.get_total_flops()


def test_cpu_attention_flops_are_counted_forward_and_backward():
    """The CPU flash kernel (what fake CPU tensors run) counts like the CUDA kernels: torch 2.14 has no
    formula for it, fastcps.plan.measure registers torch's own; forward Q·Kᵀ and P·V, backward five
    matmuls."""
    b, h, s, d = 1, 3, 40, 16
    q = torch.randn(b, h, s, d, requires_grad=True)
    with LiveBytes() as live:
        out = F.scaled_dot_product_attention(q, q, q)
        live.phase = "backward"
        out.sum().backward()
    one = 2 * b * h * s * s * d  # one (s x d) @ (d x s) matmul per head
    assert live.flops["forward"] == 2 * one
    assert live.flops["backward"] == 5 * one


def test_fake_measurement_equals_real_cpu_measurement():
    """The same tiny FLUX with LoRA, once on fake tensors, once on real CPU tensors (random weights):
    the tracker sees the same storages and FLOPs, with and without gradient checkpointing."""
    kw = dict(resolution=64, text_tokens=8, dtype="bf16", lora=LORA)
    fake = TransformerMeter("flux", TINY_FLUX, fake=True, **kw)
    real = TransformerMeter("flux", TINY_FLUX, fake=False, **kw)
    for kind, batch in [("train", 2), ("ckpt", 2), ("nograd", 3)]:
        assert fake.step(kind, batch) == real.step(kind, batch), kind
    plain, ckpt = fake.step("train", 2), fake.step("ckpt", 2)
    assert ckpt.peak < plain.peak and ckpt.saved < plain.saved
    assert ckpt.forward_flop == plain.forward_flop and ckpt.backward_flop > plain.backward_flop
    # FLOPs grow linearly with the batch
    assert fake.step("nograd", 3).forward_flop == 3 * fake.step("nograd", 1).forward_flop


def test_dev_trained_steps_come_from_the_policy_dynamic_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from fastcps.schedule import flow_sigmas

    sched = json.loads((ROOT / "configs" / "models" / "flux1-dev_scheduler.json").read_text())
    sig = policy_sigmas("flux", sched, 512, 6)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    torch.testing.assert_close(sig, flow_sigmas(6, mu=mu))
    assert not torch.allclose(sig, flow_sigmas(6, shift=3.0))  # what the old plan assumed


def tiny_meter(cfg, tiny_flux):
    return Loader(cfg, tiny_flux, evaluate=evaluate_with).model(cfg).meter


def test_plan_counts_the_trainers_own_epoch(tiny_flux):
    """flux_pickscore at 8 ranks: 48 images per rank, rollout batches of 8 (6 x 6 steps = 36 calls),
    minibatches of 8 = the rollout's batches (the first window's log-probs are the training forward's,
    the later window's are the rollout's: no recompute), 3 trained steps; FLOPs = counted calls x the
    measured cost of each call; ZeRO traffic from the same calls. ZeRO-3 partitions every tensor here
    (stage3_param_persistence_threshold 0), as it partitions FLUX.1-dev's."""
    ds = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tiny_flux.parent / "ds.json").write_text(json.dumps(ds))
    cfg = load_config(RunConfig, str(FLUX_CFG), [f"deepspeed_config={tiny_flux.parent / 'ds.json'}"])
    r = plan(cfg, 8, tiny_flux, evaluate=evaluate_with)
    m = tiny_meter(cfg, tiny_flux)
    calls, ph = r["calls_per_rank"], r["phase_flop"]
    assert r["trained_steps_range"] == [3, 3] and r["images_per_rank"] == 48 and r["optimizer_steps"] == 2
    assert (
        r["zero_stage"] == 3 and r["gradient_checkpointing"] is False
    )  # no --gpu-mem: the JSON's stage, no ckpt
    assert calls["rollout (nograd, 8 samples)"] == 36
    assert (
        calls["training forward (train, 8 samples)"] == calls["training backward (backward, 8 samples)"] == 18
    )
    assert not any(k.startswith("old log-prob recompute") for k in calls)
    eval_calls = sum(v for k, v in calls.items() if k.startswith("eval"))
    # eval every 20 epochs: 16 prompts over 8 ranks, both of a rank's prompts (2 images each) in one call
    # per step
    assert calls["eval (nograd, 4 samples)"] == eval_calls == pytest.approx(28 * math.ceil(16 / 8 / 2) / 20)
    fwd8 = m.step("nograd", 8).forward_flop
    assert ph["rollout"] == pytest.approx(8 * 36 * fwd8)
    assert ph["training forward"] == pytest.approx(8 * 18 * fwd8)
    assert ph["training backward"] == pytest.approx(8 * 18 * m.step("train", 8).backward_flop)
    assert ph["checkpoint re-forward"] == ph["old log-prob recompute"] == ph["KL reference forward"] == 0.0
    assert ph["VAE decode"] > 0 and r["epoch_flop"] == pytest.approx(sum(ph.values()))
    assert r["training_epoch_flop"] == pytest.approx(r["epoch_flop"] - ph["eval"])
    an = r["anchor_phase_flop"]  # 6 rollout forwards + 3 trained steps per image at 128 tokens (= ours here)
    assert an["rollout"] == pytest.approx(384 * 6 * m.step("nograd", 3).forward_flop / 3)
    assert r["anchor_ratio"] == pytest.approx(r["training_epoch_flop"] / r["anchor_epoch_flop"])
    # ZeRO-3: the 36 rollout, 18 training and the eval's forwards gather every partitioned tensor once;
    # a backward those of the modules whose output needs a gradient (not the adaLN and embedder layers
    # that only see the timestep); a checkpointed one every block's for the re-forward, which the
    # block's backward then uses (measure.ModuleUses; tests/test_zero3.py checks it on DeepSpeed)
    z = r["zero_traffic_bytes_per_gpu"]
    gathered = r["gathered_params"]  # the tensors at or above stage3_param_persistence_threshold
    assert gathered > 0.9 * r["transformer_params"]  # the tiny model's biggest tensors are partitioned
    threshold = Loader(cfg, tiny_flux, evaluate=evaluate_with).model(cfg).meter_threshold
    numel = {n: p.numel() for n, p in m.model.named_parameters() if p.numel() >= threshold}
    assert sum(numel.values()) == gathered and m.gathered("nograd", 8, threshold) == {"forward": gathered}
    plain, ckpt = m.step("train", 8).uses, m.step("ckpt", 8).uses
    # the modules a call uses do not depend on its batch: gathered() reads them from a small measured
    # batch, so pricing a large micro-batch's traffic measures nothing new
    for kind in ("train", "ckpt", "nograd"):
        assert m.step(kind, 1).uses == m.step(kind, 3).uses == m.step(kind, 8).uses, kind
        measured = set(m._cache)
        m.gathered(kind, 16, threshold)
        assert set(m._cache) == measured, kind
    for n in numel:
        needed = plain["backward"].get(n, 0)
        assert needed in (0, 1) and ckpt["forward"][n] == plain["forward"][n] == 1, n
        if n.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            assert ckpt["backward"][n] == 1 and ckpt["backward_unshared"][n] == 1 + needed, n
        else:
            assert ckpt["backward"].get(n, 0) == ckpt["backward_unshared"].get(n, 0) == needed, n
    assert 0 < sum(plain["backward"].values()) < len(numel)  # some modules need no backward
    for choice, uses in (("zero3", plain), ("zero3+ckpt", ckpt)):
        per_backward = sum(k * numel[n] for n, k in uses["backward"].items() if n in numel) / gathered
        assert z[choice]["gathers"] == pytest.approx(36 + 18 + eval_calls + 18 * per_backward), choice
    assert z["zero3"]["parameter all-gather"] == pytest.approx(z["zero3"]["gathers"] * 2 * gathered * 7 / 8)
    assert z["zero3+ckpt, quantized gathers"]["parameter all-gather"] == pytest.approx(
        z["zero3+ckpt"]["parameter all-gather"] / 2
    )
    assert z["zero2"]["parameter all-gather"] == pytest.approx(2 * 2 * r["trained_params"] * 7 / 8)  # 2 steps
    assert r["zero_param_traffic_bytes_per_gpu"] == z["zero3"]["parameter all-gather"]
    m2, m3 = r["memory"][2], r["memory"][3]
    total = r["transformer_params"] + r["trained_params"]  # LoRA adapters are parameters too
    assert m2["persistent"]["transformer weights"] == 2 * total  # ZeRO-2: a full copy per rank
    # ZeRO-3: a 1/8 partition, except tensors under stage3_param_persistence_threshold kept whole
    assert m3["persistent"]["transformer weights"] == pytest.approx(2 * (gathered / 8 + total - gathered))
    assert m3["peak"] == max(m3["phase_totals"].values())
    # policy.offload_frozen: T5-XXL + CLIP-L (4.885 B, bf16) come in only while prompts are encoded
    assert m3["persistent"]["text encoders"] == 0.0
    assert m3["transients"]["prompt encoding"]["text encoders moved in"] == pytest.approx(4.885e9 * 2)
    assert r["projected_epoch_s"] == pytest.approx(r["epoch_flop"] / (8 * 989e12 * 0.4))
    # bf16 under ZeRO-2/3: gradients accumulate and reduce in fp32 (fastcps.engine.deepspeed_config)
    assert m3["persistent"]["gradients (partition, fp32)"] == pytest.approx(4 * r["trained_params"] / 8)
    assert z["zero3"]["gradient reduce-scatter"] == pytest.approx(18 * 4 * r["trained_params"] * 7 / 8)
    # a LoRA checkpoint holds no frozen weight: adapter-sized files only
    files = r["checkpoint_files"]
    assert files["model states"] == 2 * r["trained_params"] and r["checkpoint_bytes"] == sum(files.values())
    # no EMA in this config; the adapter is exported in fp32, twice (peft's names and diffusers')
    assert r["checkpoint_bytes"] == (2 + 12 + 4 + 4) * r["trained_params"]
    # a save holds the fp32 adapter at once on rank 0 (above the optimizer's 1/8 partition)
    assert r["save_host_peak_bytes"] == 4 * r["trained_params"]


def test_a_saves_host_peak_is_one_export_shard_not_the_whole_model():
    """FLUX.1-dev's 11.9 B parameters, full fine-tuning in bf16 at 8 ranks under ZeRO-3: the export
    holds one 5 GB shard (the old all-at-once export held the whole model in fp32, 47.6 GB); the
    optimizer's largest partition torch.save copies is one sub-group, 4 GB. With 64 ranks the partition
    shrinks and the shard stays the peak; a small model's export is smaller than a shard; ZeRO-2's flat
    partition (trained / world) can exceed a shard; an offloaded optimizer adds nothing."""
    from types import SimpleNamespace

    from fastcps.plan import costs

    cfg = load_config(RunConfig, str(FLUX_CFG), ["policy.lora=null"])
    assert cfg.policy.dtype == "bf16"
    dev = SimpleNamespace(params=11.9e9, trained=11.9e9, largest_fetch=0.1e9)
    zero3 = SimpleNamespace(stage=3, sub_group_size=10**9, offload_optimizer=False)
    assert costs.save_host_peak(cfg, 8, dev, zero3) == 5e9
    assert costs.save_host_peak(cfg, 64, dev, zero3) == 5e9
    small = SimpleNamespace(params=1e9, trained=1e9, largest_fetch=1e7)
    assert costs.save_host_peak(cfg, 64, small, zero3) == 2e9
    zero2 = SimpleNamespace(stage=2, sub_group_size=10**9, offload_optimizer=False)
    assert costs.save_host_peak(cfg, 4, dev, zero2) == 4 * 11.9e9 / 4
    offloaded = SimpleNamespace(stage=2, sub_group_size=10**9, offload_optimizer=True)
    assert costs.save_host_peak(cfg, 4, dev, offloaded) == 5e9


def test_a_pass_the_trainer_adds_or_removes_shows_in_the_plan(tiny_flux, monkeypatch):
    """Other layouts and settings change the counted calls: minibatches of 4 under rollout batches of 8
    recompute the later window's log-probs (18 calls of 4), old_logprob = rollout does not, beta_kl > 0
    adds the reference's forward beside every training forward; and a trainer whose sampling loop ran
    every step twice would show twice the rollout calls."""
    import fastcps.rollout as rollout_mod

    def calls(*sets):
        r = plan(load_config(RunConfig, str(FLUX_CFG), list(sets)), 8, tiny_flux, evaluate=evaluate_with)
        return r["calls_per_rank"], r["phase_flop"]

    small = ["train.minibatch_size=4", "train.gradient_accumulation_steps=6", "train.micro_batch=null"]
    c, ph = calls(*small)
    assert c["old log-prob recompute (nograd, 4 samples)"] == 18 and ph["old log-prob recompute"] > 0
    c, ph = calls(*small, "train.old_logprob=rollout", "train.beta_kl=0.01")
    assert not any(k.startswith("old log-prob") for k in c) and ph["old log-prob recompute"] == 0.0
    assert c["KL reference forward (nograd, 4 samples)"] == c["training forward (train, 4 samples)"] == 36
    assert ph["KL reference forward"] == pytest.approx(ph["training forward"])
    real = rollout_mod.sample
    monkeypatch.setattr(rollout_mod, "sample", lambda *a, **k: (real(*a, **k), real(*a, **k))[1])
    c, _ = calls()
    assert c["rollout (nograd, 8 samples)"] == 72


def test_json_and_gpu_mem(tiny_flux, tmp_path):
    common = ["--config", str(FLUX_CFG), "--world-size", "8"]
    base = [*common, "--model-config", str(tiny_flux)]
    r = run_json(*base, "--gpu-mem", "80")
    for key in (
        "epoch_flop",
        "forward_flop_per_image",
        "backward_flop_per_image",
        "images_per_rank",
        "world_size",
        "peak_gib_per_gpu",
        "fits",
        "reserve_gib",
        "zero_stage",
        "zero_param_traffic_bytes_per_gpu",
        "anchor_ratio",
        "projected_epoch_s",
        "save_host_peak_bytes",
    ):
        assert key in r, key
    # zero_stage and gradient_checkpointing "auto": the tiny model fits anything: ZeRO-2, no checkpointing
    assert (
        r["fits"]
        and r["suggestion"]["set"] == []
        and r["zero_stage"] == 2
        and not r["gradient_checkpointing"]
    )
    assert (
        r["zero_param_traffic_bytes_per_gpu"]
        == r["zero_traffic_bytes_per_gpu"]["zero2"]["parameter all-gather"]
    )
    # a wider model and big minibatches so that training, not the VAE decode, sets the peak
    wide = tmp_path / "wide.json"
    wide.write_text(
        json.dumps({**TINY_FLUX, "num_attention_heads": 8, "num_layers": 4, "num_single_layers": 4})
    )
    off = [
        *common,
        "--model-config",
        str(wide),
        "--set",
        "train.minibatch_size=48",
        "--set",
        "train.gradient_accumulation_steps=1",
        "--set",
        "train.rollout_batch_size=1",
        "--set",
        "eval.every=0",
        "--set",
        "policy.offload_frozen=false",
        "--set",
        "train.micro_batch=null",  # the minibatch as written (the micro-batch search: its own test)
    ]
    peaks = run_json(*off)["peak_gib_by_choice"]
    assert peaks["zero3+ckpt"] < peaks["zero3"] < peaks["zero2"] and peaks["zero2+ckpt"] < peaks["zero2"]
    # auto takes the cheapest choice that fits: between ZeRO-3's and ZeRO-2's peaks, ZeRO-3 without
    # checkpointing
    r = run_json(*off, "--gpu-mem", str((peaks["zero3"] + peaks["zero2"]) / 2), "--reserve", "0")
    assert r["fits"] and (r["zero_stage"], r["gradient_checkpointing"]) == (3, False)
    # an explicit choice wins; then the suggestion names the lever that makes it fit
    fixed = [
        *off,
        "--set",
        "zero_stage=3",
        "--set",
        "policy.gradient_checkpointing=false",
        "--set",
        "whole_model_sampling=false",  # as in peak_gib_by_choice
    ]
    r = run_json(*fixed, "--gpu-mem", str((peaks["zero3+ckpt"] + peaks["zero3"]) / 2), "--reserve", "0")
    assert not r["fits"] and (r["zero_stage"], r["gradient_checkpointing"]) == (3, False)
    assert r["suggestion"] == {
        "set": ["policy.gradient_checkpointing=true"],
        "peak_gib": pytest.approx(peaks["zero3+ckpt"]),
        "fits": True,
    }
    # nothing fits in 1 GiB: the reward model alone is 3.7 GiB
    r = run_json(*base, "--gpu-mem", "1", "--reserve", "0")
    assert not r["fits"] and not r["suggestion"]["fits"]


def test_a_remote_reward_holds_no_training_gpu_memory():
    """PickScore in process: its CLIP ViT-H (986 M parameters, fp32) on every training GPU; served by the
    reward service (the `remote` reward): nothing there, whatever it serves."""
    from fastcps.plan.costs import reward_model_bytes

    local = load_config(RunConfig, str(FLUX_CFG)).rewards
    remote = {"name": "remote", "args": {"url": "http://reward-host:8000", "serves": "pickscore"}}
    served = load_config(RunConfig, str(FLUX_CFG), [f"rewards={json.dumps([remote])}"]).rewards
    assert reward_model_bytes(local) / 2**30 == pytest.approx(0.986e9 * 4 / 2**30)  # 3.67 GiB
    assert reward_model_bytes(served) == 0.0
    both = load_config(RunConfig, str(FLUX_CFG), [f"rewards={json.dumps([remote, {'name': 'pickscore'}])}"])
    assert reward_model_bytes(both.rewards) == reward_model_bytes(local)


def test_table_and_exit_codes(tiny_flux, capsys):
    base = ["--config", str(FLUX_CFG), "--model-config", str(tiny_flux)]
    assert main([*base, "--world-size", "8"], evaluate=evaluate_with) == 0
    text = capsys.readouterr().out
    for key in (
        "batch arithmetic",
        "calls per rank",
        "FLOPs per epoch",
        "anchor",
        "memory per GPU",
        "ZeRO-2",
        "ZeRO-3",
        "PROJECTION",
        "ZeRO traffic",
        "quantized gathers",
        "host memory a save holds at once",
    ):
        assert key in text
    assert main([*base, "--world-size", "7"], evaluate=evaluate_with) == 2  # 384 images do not split over 7
    assert "train.prompts_per_epoch" in capsys.readouterr().err
    assert main([*base, "--world-size", "8", "--set", "policy.resolution=500"], evaluate=evaluate_with) == 2
    assert "policy.resolution" in capsys.readouterr().err
    assert (
        main([*base, "--world-size", "8", "--set", "deepspeed_config=missing.json"], evaluate=evaluate_with)
        == 2
    )
    assert "deepspeed_config" in capsys.readouterr().err
    assert (
        main(
            ["--config", str(ROOT / "configs" / "digits_cps.json"), "--world-size", "1"],
            evaluate=evaluate_with,
        )
        == 2
    )
    assert "policy.name" in capsys.readouterr().err


def local_tiny_pipeline(tmp_path, tiny_flux) -> Path:
    """A local pipeline folder the plan reads its model configs from: the tiny transformer, FLUX's VAE
    and FLUX.1-dev's scheduler (no weights, no text encoders: those count at their published sizes)."""
    models = ROOT / "configs" / "models"
    for sub, src, name in (
        ("transformer", tiny_flux, "config.json"),
        ("vae", models / "flux1_vae.json", "config.json"),
        ("scheduler", models / "flux1-dev_scheduler.json", "scheduler_config.json"),
    ):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_text(Path(src).read_text())
    return tmp_path


def test_auto_resolves_for_the_gpu_and_stays_put_on_the_cpu(tiny_flux, tmp_path, monkeypatch):
    """zero_stage / gradient_checkpointing / micro_batch "auto" (configs/flux_pickscore.json): on the CPU
    the JSON's stage, no checkpointing, the configured minibatch; on a CUDA device the cheapest choice
    whose planned peak fits its memory minus memory_reserve (a local pipeline folder with the tiny
    transformer; the device's memory is given)."""
    from types import SimpleNamespace

    from fastcps.plan import resolve_auto
    from fastcps.engine import deepspeed_config

    cfg = load_config(RunConfig, str(FLUX_CFG))
    assert cfg.zero_stage == "auto" and cfg.policy.gradient_checkpointing == "auto"
    assert cfg.train.micro_batch == "auto"
    out, line = resolve_auto(cfg, 8, "cpu", evaluate_with)
    assert out.zero_stage is None and out.policy.gradient_checkpointing is False and "ZeRO stage 3" in line
    assert out.whole_model_sampling is False and "whole-model sampling off" in line
    t = out.train  # the configured minibatch, and the rollout's batch the same
    assert (t.micro_batch, t.minibatch_size, t.rollout_batch_size, t.gradient_accumulation_steps) == (
        None,
        8,
        8,
        3,
    )
    local = load_config(
        RunConfig,
        str(FLUX_CFG),
        [
            f"policy.pretrained={local_tiny_pipeline(tmp_path, tiny_flux)}",
            "policy.offload_frozen=false",
            "eval.every=0",
            "train.micro_batch=null",
            "memory_reserve.fraction=0",
        ],
    )
    peaks = plan(local, 8, evaluate=evaluate_with)["peak_gib_by_choice"]
    # whole_model_sampling "auto": only under ZeRO-3, on when the sampling phases fit with the whole model
    # gathered (this tiny transformer is smaller than ZeRO-3's prefetch bucket: it always fits)
    for gib, expect in (
        (peaks["zero2"] + 0.1, (2, False, False)),
        ((peaks["zero3"] + peaks["zero2"]) / 2, (3, False, True)),
    ):
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda d, g=gib: SimpleNamespace(total_memory=g * 2**30)
        )
        out, line = resolve_auto(local, 8, "cuda:0", evaluate_with)
        got = (out.zero_stage, out.policy.gradient_checkpointing, out.whole_model_sampling)
        assert got == expect, (gib, peaks, line)
    # memory_reserve keeps its share free: the same GPU with 8 % reserved no longer fits ZeRO-2
    gib = peaks["zero2"] / 0.95
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib * 2**30)
    )
    assert resolve_auto(local, 8, "cuda:0", evaluate_with)[0].zero_stage == 2
    reserved = local.model_copy(
        update={"memory_reserve": local.memory_reserve.model_copy(update={"fraction": 0.08})}
    )
    out, line = resolve_auto(reserved, 8, "cuda:0", evaluate_with)
    assert out.zero_stage == 3 and f"{0.08 * gib:.1f} GiB kept free" in line, line
    # an explicit stage is not "auto": it stays; the trainer's DeepSpeed config takes it over the JSON's
    fixed = load_config(
        RunConfig,
        str(FLUX_CFG),
        [
            "zero_stage=2",
            "policy.gradient_checkpointing=true",
            "whole_model_sampling=false",
            "train.micro_batch=null",
        ],
    )
    assert resolve_auto(fixed, 8, "cpu", evaluate_with) == (fixed, None)
    assert deepspeed_config(fixed, 8)["zero_optimization"]["stage"] == 2
    # an explicit micro-batch applies everywhere: rollout = minibatch = 4, twice the accumulation
    four = resolve_auto(
        fixed.model_copy(update={"train": fixed.train.model_copy(update={"micro_batch": 4})}),
        8,
        "cpu",
        evaluate_with,
    )
    t = four[0].train
    assert (t.micro_batch, t.minibatch_size, t.rollout_batch_size, t.gradient_accumulation_steps) == (
        None,
        4,
        4,
        6,
    )


def test_activation_extrapolation_equals_a_measurement():
    """The micro-batch search prices every batch from three measurements a kind: from 2 samples on the
    live bytes at the peak are affine in the batch (batch-independent rotary tables and ids beside
    batch-proportional activations), so 4 and 7 samples extrapolated equal 4 and 7 measured, to the byte
    (FLUX.1-dev at 512 px: the same for 4 and 8, fastcps.plan.measure.TransformerMeter.activation); the
    FLOPs (``flops``) likewise, exactly."""
    kw = dict(resolution=64, text_tokens=8, dtype="bf16", lora=LORA)
    m = TransformerMeter("flux", TINY_FLUX, **kw)
    for kind in ("train", "ckpt", "nograd"):
        for batch in (4, 7):
            measured = m.step(kind, batch)
            assert m.activation(kind, batch) == (measured.peak, measured.saved), (kind, batch)
            assert m.flops(kind, batch) == (measured.forward_flop, measured.backward_flop), (kind, batch)
        assert m.activation(kind, 2) == (m.step(kind, 2).peak, m.step(kind, 2).saved)  # measured


def test_micro_batch_search_keeps_the_images_per_step(tiny_flux, tmp_path):
    """micro_batch "auto": every divisor of the images per optimizer step (8 x 3 = 24 per rank) is a
    candidate, rollout batch = minibatch = the micro-batch, the accumulation scaled to keep 24; the
    choice is the cheapest in FLOPs (no checkpointing), then traffic (ZeRO-2 first), then the largest
    micro-batch that fits; the plan's JSON says which, and the headroom it leaves."""
    from fastcps.plan.choose import micro_batch_changes, micro_batches

    # FLUX.1-dev's width with 10 of its 57 blocks: training activations, not the fp32 VAE decode, set
    # ZeRO-2's peak from 4 images on
    mid = {
        **TINY_FLUX,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "axes_dims_rope": [16, 56, 56],
        "num_layers": 3,
        "num_single_layers": 7,
    }
    (tmp_path / "mid.json").write_text(json.dumps(mid))
    base = [
        "--config",
        str(FLUX_CFG),
        "--world-size",
        "8",
        "--model-config",
        str(tmp_path / "mid.json"),
        "--set",
        "eval.every=0",
        "--set",
        "policy.offload_frozen=false",
        "--reserve",
        "0",
    ]
    cfg = load_config(RunConfig, str(FLUX_CFG))
    assert micro_batches(cfg) == [24, 12, 8, 6, 4, 3, 2, 1]
    assert micro_batch_changes(cfg, 4) == {
        "train.micro_batch": None,
        "train.rollout_batch_size": 4,
        "train.minibatch_size": 4,
        "train.gradient_accumulation_steps": 6,
    }
    roomy = run_json(*base, "--gpu-mem", "1000")
    every = {(c["choice"], c["micro_batch"]): c["peak_gib"] for c in roomy["candidates"]}
    zero2 = {b: every[("zero2", b)] for b in (24, 12, 8, 6, 4, 3, 2, 1)}
    assert zero2[12] < zero2[24] and zero2[6] < zero2[8]  # training activations set the peak here
    # between ZeRO-2's peaks at 6 and 8: ZeRO-2 at 6, no checkpointing (cheaper than ZeRO-2 + ckpt at 24)
    r = run_json(*base, "--gpu-mem", str((zero2[6] + zero2[8]) / 2))
    assert (r["zero_stage"], r["gradient_checkpointing"], r["micro_batch"]) == (2, False, 6), r["candidates"][
        :4
    ]
    assert (r["rollout_batch_size"], r["gradient_accumulation_steps"]) == (6, 4)
    assert r["images_per_rank"] == 48 and r["optimizer_steps"] == 2  # the same optimizer steps
    assert r["calls_per_rank"]["training forward (train, 6 samples)"] == 8 * 3  # 8 minibatches x 3 steps
    assert not any(k.startswith("old log-prob recompute") for k in r["calls_per_rank"])  # rollout's reused
    assert r["headroom_gib"] == pytest.approx((zero2[8] - zero2[6]) / 2, rel=1e-6)
    assert r["anchor_ratio"] == pytest.approx(roomy["anchor_ratio"])  # the same FLOPs per image
    # a micro-batch given is taken as it is
    r = run_json(*base, "--gpu-mem", "1000", "--set", "train.micro_batch=3")
    assert (r["micro_batch"], r["rollout_batch_size"], r["gradient_accumulation_steps"]) == (3, 3, 8)


def test_reserve_and_headroom(tiny_flux):
    """--reserve: a percentage of --gpu-mem or GiB; by default the config's memory_reserve (8 %). The
    choice fits the peak under --gpu-mem minus the reserve; headroom_gib is --gpu-mem minus the peak."""
    from fastcps.plan.choose import parse_reserve

    assert parse_reserve("8%").fraction == 0.08 and parse_reserve("6.5").gib == 6.5
    assert parse_reserve("2GiB").gib == 2.0 and parse_reserve("2GiB").fraction == 0.0
    for bad in ("x", "-1", "100%"):
        with pytest.raises(ValueError, match="--reserve"):
            parse_reserve(bad)
    base = ["--config", str(FLUX_CFG), "--world-size", "8", "--model-config", str(tiny_flux)]
    r = run_json(*base, "--gpu-mem", "80")
    assert r["reserve_gib"] == pytest.approx(6.4) and r["reserve"] == {"fraction": 0.08, "gib": 0.0}
    peak = r["gpu_mem_gib"] - r["headroom_gib"]
    assert peak == pytest.approx(max(r["peak_gib_per_gpu"], r["load_peak_gib_per_gpu"]))
    # just above the peak: fits without a reserve, not with 8 % or 1 GiB kept free
    tight = str(peak * 1.01)
    assert run_json(*base, "--gpu-mem", tight, "--reserve", "0")["fits"]
    assert not run_json(*base, "--gpu-mem", tight)["fits"]
    assert not run_json(*base, "--gpu-mem", tight, "--reserve", "1")["fits"]
    assert run_json(*base, "--gpu-mem", tight, "--set", "memory_reserve.fraction=0.005")["fits"]


def test_the_plan_counts_where_the_trainer_encodes(tiny_flux, monkeypatch):
    """Encoding is a phase of its own: the text encoders (policy.offload_frozen) next to what is resident.
    The trainer's eval encodes before its whole-model gather, so under ZeRO-3 with whole-model sampling
    the phase holds the partitions only; a trainer that encoded inside the gather shows in the plan as
    the whole transformer beside the text encoders."""
    from fastcps.plan import costs as pc
    from fastcps.plan import epoch as pe
    from fastcps.rollout import whole_model
    from fastcps.trainer import Trainer

    cfg = load_config(RunConfig, str(FLUX_CFG), ["zero_stage=3", "whole_model_sampling=true"])
    loader = Loader(cfg, tiny_flux, evaluate=evaluate_with)
    model = loader.model(cfg)
    counted = pe.counted_epoch(cfg, 8, model)
    assert counted["encodes"] and not any(whole for (_, whole) in counted["encodes"])
    assert {phase for phase, _ in counted["encodes"]} == {"rollout", "eval"}
    enc = pc.memory(cfg, 8, model, loader.load_zero(3))["transients"]["prompt encoding"]
    assert list(enc) == ["text encoders moved in"]

    real = Trainer.evaluate

    def encoding_inside_the_gather(self, step):
        with whole_model(self.engine, True):
            return real(self, step)

    monkeypatch.setattr(Trainer, "evaluate", encoding_inside_the_gather)
    model.counted.clear()  # counted again, on the patched trainer
    counted = pe.counted_epoch(cfg, 8, model)
    assert counted["encodes"][("eval", True)] > 0
    enc = pc.memory(cfg, 8, model, loader.load_zero(3))["transients"]["prompt encoding"]
    assert enc["whole transformer gathered (encoding inside the gather)"] == 2 * (model.params - model.small)


def test_text_encoders_of_a_local_folder_are_counted_from_its_files(tmp_path):
    """A local pipeline folder's text encoders are counted from their safetensors headers (the GPU check's
    tiny encoders are not T5-XXL); a hub id keeps the published sizes."""
    from transformers import CLIPTextModel, T5EncoderModel

    from fastcps.plan.resources import local_text_encoder_params
    from fastcps.testing import save_tiny_flux

    folder = save_tiny_flux(tmp_path / "flux")
    n = sum(
        p.numel()
        for cls, sub in ((CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2"))
        for p in cls.from_pretrained(folder / sub).parameters()
    )
    assert local_text_encoder_params(str(folder)) == n > 0
    assert local_text_encoder_params("black-forest-labs/FLUX.1-dev") is None


def test_smallest_gpu_decides_for_every_rank(tiny_flux, tmp_path, monkeypatch):
    """Each rank resolves "auto" for the smallest GPU of the run: an all-reduce MIN of the total memory
    (here a stand-in for the reduction, as one rank with 2 x the memory of the other would see it)."""
    import torch.distributed as tdist
    from types import SimpleNamespace

    from fastcps.plan import resolve_auto

    choose_mod = importlib.import_module("fastcps.plan.choose")  # the module, not fastcps.plan.choose()

    local = load_config(
        RunConfig,
        str(FLUX_CFG),
        [
            f"policy.pretrained={local_tiny_pipeline(tmp_path, tiny_flux)}",
            "policy.offload_frozen=false",
            "eval.every=0",
            "train.micro_batch=null",
        ],
    )
    peaks = plan(local, 8, evaluate=evaluate_with)["peak_gib_by_choice"]
    big, small = peaks["zero2"] * 2, peaks["zero2"] * 0.9  # ZeRO-2 fits the big GPU only
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=big * 2**30)
    )
    assert resolve_auto(local, 8, "cuda:0", evaluate_with)[0].zero_stage == 2  # alone: its own memory
    reduced = []

    def all_reduce(t, op):
        assert op == tdist.ReduceOp.MIN and t.device.type == "cpu"  # gloo: on the CPU
        reduced.append(int(t.item()))
        t.fill_(min(int(t.item()), int(small * 2**30)))

    # the process group as fastcps.plan.choose sees it (only there: the counted epoch runs on one rank)
    group = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_world_size=lambda: 2,
        get_backend=lambda: "gloo",
        all_reduce=all_reduce,
        ReduceOp=tdist.ReduceOp,
    )
    monkeypatch.setattr(choose_mod, "tdist", group)
    out, line = resolve_auto(local, 8, "cuda:0", evaluate_with)
    assert reduced == [int(big * 2**30)] and out.zero_stage == 3, line
    assert f"of {small:.1f} GiB, the smallest GPU of the run" in line


def _min_memory_rank(rank: int, init: str, totals: list, out: str) -> None:
    from types import SimpleNamespace

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=len(totals))
    torch.cuda.get_device_properties = lambda d: SimpleNamespace(total_memory=totals[rank])
    from fastcps.plan.choose import smallest_total_memory

    Path(out, f"{rank}.txt").write_text(str(smallest_total_memory("cuda:0")))
    torch.distributed.destroy_process_group()


def test_smallest_total_memory_on_two_gloo_ranks(tmp_path):
    """The reduction itself, on two real processes over gloo (the CPU backend): both get the smaller."""
    import torch.multiprocessing as mp

    totals = [80 * 2**30, 40 * 2**30]
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_min_memory_rank, args=(init, totals, str(tmp_path)), nprocs=2, start_method="spawn")
    assert [int((tmp_path / f"{r}.txt").read_text()) for r in (0, 1)] == [40 * 2**30] * 2


def test_geneval_in_process_holds_its_detector_and_colour_classifier():
    """geneval's default detector (mask2former) puts Mask2Former Swin-S (68.7 M, `dtype` float32) and
    open_clip ViT-L-14 (427.6 M, `clip_dtype` amp: fp32 weights) on every training GPU; a detection server
    puts nothing there; each part follows its own dtype argument."""
    from fastcps.plan.costs import reward_model_bytes

    def bytes_of(args):
        cfg = load_config(
            RunConfig, str(FLUX_CFG), [f"rewards={json.dumps([{'name': 'geneval', 'args': args}])}"]
        )
        return reward_model_bytes(cfg.rewards)

    assert bytes_of({}) == pytest.approx((0.0687 + 0.4276) * 1e9 * 4)
    assert bytes_of({"clip_dtype": "bf16"}) == pytest.approx((0.0687 * 4 + 0.4276 * 2) * 1e9)
    assert bytes_of({"detector": "server", "url": "http://detector:80"}) == 0.0
