"""``python -m fastcps.gpucheck`` on a machine without CUDA says what it needs and exits 2; its two
training parts run here on the CPU at tiny sizes (the same code the GPU check runs at full size), so a
GPU session does not find their wiring broken."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcps.gpucheck.runs import flux_epoch, toy_run
from fastcps.testing import CLIP_DIM, T5_DIM

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_what_it_needs_and_exits_2(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fastcps.gpucheck", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA device" in res.stderr and "python -m fastcps.gpucheck" in res.stderr
    assert not (tmp_path / "gpucheck.csv").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "fastcps.gpucheck", "--parts", "tests,gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown part(s) ['gpu']" in bad.stderr


@pytest.mark.slow
def test_flux_epoch_part_runs_at_tiny_size():
    """The FLUX part runs at the settings the trainer's "auto" takes for the GPU's memory (given here: the
    CPU has none), and its rows hold the run's peaks (reserved and allocated: CUDA only) beside the
    plan's peak for the settings it ran. With room for anything the choice is ZeRO-2, no checkpointing and
    the largest micro-batch (8: the 4 x 2 images per optimizer step), not the settings as written
    (ZeRO-3 from ds_zero3.json, minibatch 4)."""
    tiny = dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM,
        guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    )
    rows = {
        r["metric"]: r
        for r in flux_epoch(
            torch.device("cpu"),
            model_config=tiny,
            resolution=64,
            images=16,
            text_dims=(T5_DIM, CLIP_DIM),
            max_sequence_length=32,
            lora_r=4,
            gpu_mem_gib=1000.0,
        )
    }
    for key in ("images_per_s", "epoch_s", "rollout_s", "reward_s", "update_s"):
        assert rows[key]["value"] > 0, rows[key]
    # rollout batch = minibatch: the later windows reuse the rollout's log-probs when the first window's
    # equal them (the CPU's kernels: no recompute pass)
    assert rows["update_s"]["value"] >= rows["recompute_s"]["value"] >= 0
    ran = {
        k: rows[k]["value"]
        for k in ("zero_stage", "gradient_checkpointing", "whole_model_sampling", "micro_batch")
    }
    assert ran == {"zero_stage": 2, "gradient_checkpointing": 0, "whole_model_sampling": 0, "micro_batch": 8}
    assert (
        "ZeRO-2" in rows["settings"]["value"]
        and "micro-batch 8 (rollout 8, 1 per step)" in rows["settings"]["value"]
    )
    # the plan of the settings run: its peak, the headroom on the given memory; measured peaks: CUDA only
    assert 0 < rows["plan_peak_gib"]["value"] < 1000
    assert rows["plan_headroom_gib"]["value"] == pytest.approx(1000 - rows["plan_peak_gib"]["value"])
    assert rows["peak_reserved_gib"]["value"] is None and rows["peak_allocated_gib"]["value"] is None
    assert "plan" in rows["peak_reserved_gib"]["note"] and "allocated" in rows["peak_reserved_gib"]["note"]
    json.dumps(list(rows.values()))  # the child process prints them as JSON


@pytest.mark.slow
def test_toy_part_reports_agreement():
    rows = {r["metric"]: r["value"] for r in toy_run(torch.device("cpu"), dtypes=("fp32",), epochs=1)}
    assert rows["impl"] == "torch"
    # fp32 on the CPU, rollout batch 32 = minibatch 32: the training forward repeats the rollout's exactly
    assert rows["fp32/logprob_max_abs_diff"] == 0.0 and rows["fp32/ratio_dev_first_update"] == 0.0
    assert rows["fp32/images_per_s"] > 0
