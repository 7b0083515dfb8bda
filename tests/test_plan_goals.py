"""The recipes' goals (the plan at full size): each shipped recipe on 8 GPUs of the sizes it targets, the
real transformer built from configs/models on fake tensors, fits with the headroom rule (>= 8 % of the GPU
free of the planned peak) at most at the anchor's training FLOPs where the issue asks it. Slow: each
measures a real 8-20 B-parameter transformer."""

import pytest

from fastcps.policies.flux import FluxPolicy
from plan_support import (
    FLUX_CFG,
    KONTEXT_CFG,
    QWEN_CFG,
    ROOT,
    SD35L_CFG,
    SHIPPED_GENEVAL,
    run_json,
)


@pytest.mark.slow
def test_real_flux_dev_measurement():
    """The real FLUX.1-dev transformer (11.9 B) with LoRA r 64: one training micro-step of one image."""
    from fastcps.plan.measure import meter

    m = meter(
        "flux",
        str(ROOT / "configs" / "models" / "flux1-dev_transformer.json"),
        512,
        512,
        "bf16",
        (64, 128.0, tuple(FluxPolicy.default_lora_targets)),
    )
    params = list(m.model.parameters())
    lora = sum(p.numel() for p in params if p.requires_grad)
    assert sum(p.numel() for p in params) - lora == 11_901_408_320 and lora == 179_306_496
    step = m.step("ckpt", 1)
    # ~2 x 11.9 B x 1536 tokens (20.19 TFLOP) plus 57 attention calls of 24 heads x 1536² x 128, Q·Kᵀ and
    # P·V (1.65 TFLOP): torch 2.15 counts 21.85 itself, torch 2.14 with fastcps.plan.measure's formulas.
    attention = 57 * 2 * (2 * 24 * 1536 * 1536 * 128)
    assert 21.84e12 < step.forward_flop < 21.86e12, step.forward_flop
    # backward: the 5 attention matmuls of torch's sdpa backward formula (2.5x the forward's two) on top
    # of 2x the linear layers' forward (input and weight gradients; LoRA's frozen base gets only input ones)
    assert step.backward_flop > 2.5 * attention, step.backward_flop
    assert 0.3 * 2**30 < step.peak < 2 * 2**30


@pytest.mark.slow
def test_flux_dev_goals_at_80_40_and_24_gb():
    """configs/flux_pickscore.json on 8 GPUs, the real FLUX.1-dev on fake tensors: at 80 GB the anchor's
    training FLOPs (1.000x) with no parameter gathers beyond ZeRO-2's; at 40 and 24 GB at most 1.25x;
    on each at least 8 % of the GPU left free of the planned peak (the VAE decoding in fp32)."""
    got = {}
    for gib in (80, 79.1, 40, 24):  # 79.1: what torch reports for an 80 GB H100
        r = run_json("--config", str(FLUX_CFG), "--world-size", "8", "--gpu-mem", str(gib))
        got[gib] = r
        assert r["fits"] and r["headroom_gib"] >= 0.08 * gib, (gib, r["headroom_gib"], r["candidates"][:3])
        assert r["micro_batch"] == r["rollout_batch_size"]  # the rollout's log-probs stay reusable
        assert r["micro_batch"] * r["gradient_accumulation_steps"] == 24  # 8 x 3 as configured
    for gib in (80, 79.1):
        assert got[gib]["anchor_ratio"] == pytest.approx(1.0, abs=5e-4)
        assert got[gib]["zero_stage"] == 2 and got[gib]["zero_param_gathers"] == 0
    for gib in (40, 24):
        assert got[gib]["anchor_ratio"] <= 1.25, (gib, got[gib]["anchor_ratio"])


@pytest.mark.slow
def test_qwenimage_goals_at_80_and_40_gb():
    """The Qwen-Image recipe (FlowCPS's pickscore_qwenimage_8gpu: 32 prompts x 16, 10 steps, SDE window 2,
    true CFG 4, LoRA r 64) on 8 GPUs, the real 20.4 B-parameter transformer on fake tensors: on an 80 GB
    H100 (79.1 GiB as torch reports it) at most FlowCPS's training FLOPs counted as its code runs them, on
    a 40 GB A100 (39.4 GiB) a fitting choice; each with at least 8 % of the GPU left free of the planned
    peak (the first-run issue's headroom rule)."""
    got = {}
    for gib in (79.1, 39.4):
        r = run_json("--config", str(QWEN_CFG), "--world-size", "8", "--gpu-mem", str(gib))
        got[gib] = r
        assert r["fits"] and r["headroom_gib"] >= 0.08 * gib, (gib, r["headroom_gib"], r["candidates"][:3])
        assert r["micro_batch"] == r["rollout_batch_size"]
        assert r["micro_batch"] * r["gradient_accumulation_steps"] == 32  # 8 x 4 as configured
    assert got[79.1]["anchor_ratio"] <= 1.0, got[79.1]["anchor_ratio"]


@pytest.mark.slow
def test_sd35_large_fits_24_gb():
    """configs/sd35l_geneval.json (the SD3.5-Medium recipe on SD3.5-Large) on 8 x 24 GB cards (23.6 GiB as
    torch reports them), the real 8.1 B-parameter transformer on fake tensors: a fitting choice with at
    least 8 % of the GPU left free of the planned peak."""
    gib = 23.6
    r = run_json("--config", str(SD35L_CFG), "--world-size", "8", "--gpu-mem", str(gib), *SHIPPED_GENEVAL)
    assert r["fits"] and r["headroom_gib"] >= 0.08 * gib, (r["headroom_gib"], r["candidates"][:3])
    assert r["micro_batch"] * r["gradient_accumulation_steps"] == 12  # 4 x 3 as configured
    assert r["transformer_params"] > 8.0e9


@pytest.mark.slow
def test_kontext_goals_at_80_and_40_gb():
    """The Kontext recipe (FlowCPS's counting_flux_kontext: 48 prompts x 21, 6 steps with 5 trained, CPS eta
    0.9, LoRA r 64 on FLUX's targets + proj_mlp, 1024 target + 1024 source tokens) on 8 GPUs, the real
    11.9 B-parameter transformer on fake tensors: on an 80 GB H100 (79.1 GiB) at most FlowCPS's training
    FLOPs, on a 40 GB A100 (39.4 GiB) a fitting choice; each with at least 8 % of the GPU left free of the
    planned peak (the headroom rule)."""
    got = {}
    for gib in (79.1, 39.4):
        r = run_json("--config", str(KONTEXT_CFG), "--world-size", "8", "--gpu-mem", str(gib))
        got[gib] = r
        assert r["fits"] and r["headroom_gib"] >= 0.08 * gib, (gib, r["headroom_gib"], r["candidates"][:3])
        assert r["micro_batch"] * r["gradient_accumulation_steps"] == 63  # 3 x 21 as configured
    assert got[79.1]["anchor_ratio"] <= 1.0, got[79.1]["anchor_ratio"]
