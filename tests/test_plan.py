"""``python -m fastcps.plan`` and its measurements (``fastcps.measure``): the memory tracker against known
tensor sizes, FLOPs against a hand count and FlopCounterMode, fake-tensor measurements against the same
measurement on real CPU tensors, the epoch arithmetic, the JSON, ``--gpu-mem`` and the exit codes.
Tiny transformer configs keep these fast; one slow test measures the real FLUX.1-dev."""

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastcps.config import RunConfig
from fastcps.configlib import load_config
from fastcps.measure import LiveBytes, TransformerMeter
from fastcps.plan import main, plan, policy_sigmas
from fastcps.policies.flux import FluxPolicy

ROOT = Path(__file__).resolve().parent.parent
FLUX_CFG = ROOT / "configs" / "flux_pickscore.json"
TINY_FLUX = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6],
             "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 32, "num_attention_heads": 2,
             "num_layers": 2, "num_single_layers": 2, "patch_size": 1, "pooled_projection_dim": 32}
LORA = (4, 8.0, tuple(FluxPolicy.default_lora_targets))


@pytest.fixture
def tiny_flux(tmp_path):
    path = tmp_path / "tiny_flux.json"
    path.write_text(json.dumps(TINY_FLUX))
    return path


def run_json(*argv) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([*argv, "--json"]) == 0
    return json.loads(buf.getvalue())


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
    formula for it, fastcps.measure registers torch's own; forward Q·Kᵀ and P·V, backward five matmuls."""
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


def test_plan_arithmetic_on_a_tiny_transformer(tiny_flux):
    cfg = load_config(RunConfig, str(FLUX_CFG))
    r = plan(cfg, 8, tiny_flux)
    fwd, bwd, rec = r["forward_flop_per_image"], r["backward_flop_per_image"], r["recompute_flop_per_image"]
    n, ph = r["passes"], r["phase_flop"]
    assert r["trained_steps_range"] == [3, 3] and n["per_rank"] == 48 and r["optimizer_steps"] == 2
    assert ph["rollout"] == pytest.approx(8 * 48 * 6 * fwd)
    # 12 minibatches of 4, 6 per optimizer step: the first window's 24 images take their old log-probs
    # from the training forward, the second window's 24 are recomputed
    assert ph["old log-prob recompute"] == pytest.approx(8 * 24 * 3 * fwd)
    assert ph["training backward"] == pytest.approx(8 * 48 * 3 * bwd)
    assert ph["checkpoint re-forward"] == pytest.approx(8 * 48 * 3 * rec)
    assert ph["KL reference forward"] == 0.0
    assert ph["eval (amortised)"] == pytest.approx(math.ceil(16 / 8) * 2 * 28 / 20 * fwd * 8)
    assert r["epoch_flop"] == pytest.approx(sum(ph.values()))
    fg = r["flow_grpo_phase_flop"]  # flow_grpo: 5 of 6 steps trained, no recompute, no checkpointing
    assert fg["training forward"] == pytest.approx(384 * 5 * fwd) and fg["rollout"] == ph["rollout"]
    assert r["flow_grpo_epoch_flop"] == pytest.approx(384 * (6 * fwd + 5 * (fwd + bwd)))
    # ZeRO traffic: 36 rollout calls + 18 recompute + 36 training forwards + 36 backwards + 36
    # re-forwards + 2.8 eval calls, each gathering the partitioned weights
    z = r["zero_traffic_bytes_per_gpu"]
    assert z["zero3_gathers"] == pytest.approx(4 * 36 + 18 + 2 * 28 / 20)
    assert z["zero3_allgather"] == pytest.approx(z["zero3_gathers"] * 2 * z["gathered_params"] * 7 / 8)
    assert z["zero2_allgather"] == pytest.approx(2 * 2 * r["trained_params"] * 7 / 8)
    m2, m3 = r["memory"][2], r["memory"][3]
    total = r["transformer_params"] + r["trained_params"]  # LoRA adapters are parameters too
    assert m2["persistent"]["transformer weights"] == 2 * total  # ZeRO-2: a full copy per rank
    # ZeRO-3: a 1/8 partition, except tensors under stage3_param_persistence_threshold (1e5) kept whole
    small = total - z["gathered_params"]
    assert m3["persistent"]["transformer weights"] == pytest.approx(2 * (z["gathered_params"] / 8 + small))
    assert m3["peak"] == max(m3["phase_totals"].values())
    # policy.offload_frozen: T5-XXL + CLIP-L (4.885 B, bf16) come in only while prompts are encoded
    assert m3["persistent"]["text encoders"] == 0.0
    assert m3["transients"]["prompt encoding"]["text encoders moved in"] == pytest.approx(4.885e9 * 2)
    assert r["projected_epoch_s"] == pytest.approx(r["epoch_flop"] / (8 * 989e12 * 0.4))
    no_recompute = plan(load_config(RunConfig, str(FLUX_CFG), ["train.old_logprob=rollout", "train.beta_kl=0.01"]),
                        8, tiny_flux)
    assert no_recompute["phase_flop"]["old log-prob recompute"] == 0.0
    assert no_recompute["phase_flop"]["KL reference forward"] == pytest.approx(ph["training forward"])


def test_json_and_gpu_mem(tiny_flux, tmp_path):
    common = ["--config", str(FLUX_CFG), "--world-size", "8"]
    base = [*common, "--model-config", str(tiny_flux)]
    r = run_json(*base, "--gpu-mem", "80")
    for key in ("forward_flop_per_image", "epoch_flop", "peak_gib_per_gpu", "fits", "flow_grpo_epoch_flop",
                "zero_traffic_bytes_per_gpu", "projected_epoch_s"):
        assert key in r
    assert r["fits"] and r["suggestion"]["set"] == []
    # without checkpointing, a limit between the two peaks is met by turning it on, the cheapest lever
    # (a wider model and big minibatches so that training, not the VAE decode, sets the peak)
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({**TINY_FLUX, "num_attention_heads": 8, "num_layers": 4, "num_single_layers": 4}))
    off = [*common, "--model-config", str(wide), "--set", "policy.gradient_checkpointing=false",
           "--set", "train.minibatch_size=48", "--set", "train.gradient_accumulation_steps=1",
           "--set", "train.rollout_batch_size=1", "--set", "eval.every=0", "--set", "policy.offload_frozen=false"]
    r = run_json(*off)
    with_ckpt, without = r["peak_gib_with_checkpointing"], r["peak_gib_without_checkpointing"]
    assert with_ckpt < without
    r = run_json(*off, "--gpu-mem", str((with_ckpt + without) / 2), "--reserve", "0")
    assert not r["fits"]
    assert r["suggestion"] == {"set": ["policy.gradient_checkpointing=true"], "peak_gib": pytest.approx(with_ckpt),
                               "fits": True}
    # nothing fits in 1 GiB: the reward model alone is 3.7 GiB
    r = run_json(*base, "--gpu-mem", "1", "--reserve", "0")
    assert not r["fits"] and not r["suggestion"]["fits"]


def test_table_and_exit_codes(tiny_flux, capsys):
    base = ["--config", str(FLUX_CFG), "--model-config", str(tiny_flux)]
    assert main([*base, "--world-size", "8"]) == 0
    text = capsys.readouterr().out
    for key in ("batch arithmetic", "FLOPs per epoch", "flow_grpo recipe", "memory per GPU", "ZeRO-2", "ZeRO-3",
                "PROJECTION", "ZeRO traffic"):
        assert key in text
    assert main([*base, "--world-size", "7"]) == 2  # 384 images do not split over 7
    assert "train.prompts_per_epoch" in capsys.readouterr().err
    assert main([*base, "--world-size", "8", "--set", "policy.resolution=500"]) == 2
    assert "policy.resolution" in capsys.readouterr().err
    assert main([*base, "--world-size", "8", "--set", "deepspeed_config=missing.json"]) == 2
    assert "deepspeed_config" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs" / "digits_cps.json"), "--world-size", "1"]) == 2
    assert "policy.name" in capsys.readouterr().err


@pytest.mark.slow
def test_real_flux_dev_measurement():
    """The real FLUX.1-dev transformer (11.9 B) with LoRA r 64: one training micro-step of one image."""
    from fastcps.measure import meter

    m = meter("flux", str(ROOT / "configs" / "models" / "flux1-dev_transformer.json"), 512, 512, "bf16",
              (64, 128.0, tuple(FluxPolicy.default_lora_targets)))
    params = list(m.model.parameters())
    lora = sum(p.numel() for p in params if p.requires_grad)
    assert sum(p.numel() for p in params) - lora == 11_901_408_320 and lora == 179_306_496
    step = m.step("ckpt", 1)
    # ~2 x 11.9 B x 1536 tokens (20.19 TFLOP) plus 57 attention calls of 24 heads x 1536² x 128, Q·Kᵀ and
    # P·V (1.65 TFLOP): torch 2.15 counts 21.85 itself, torch 2.14 with fastcps.measure's formulas.
    attention = 57 * 2 * (2 * 24 * 1536 * 1536 * 128)
    assert 21.84e12 < step.forward_flop < 21.86e12, step.forward_flop
    # backward: the 5 attention matmuls of torch's sdpa backward formula (2.5x the forward's two) on top
    # of 2x the linear layers' forward (input and weight gradients; LoRA's frozen base gets only input ones)
    assert step.backward_flop > 2.5 * attention, step.backward_flop
    assert 0.3 * 2**30 < step.peak < 2 * 2**30
