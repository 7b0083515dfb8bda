"""The plan of each model family from its registry entry (``fastcps.policies.plan_facts``): SD3.5-Large,
Qwen-Image, FLUX.1 Kontext and Qwen-Image-Edit on tiny transformer configs, their anchors counted as the
anchors' code runs them."""

import json
from pathlib import Path

import pytest
import torch

from fastcps.config import RunConfig, load_config
from plan_support import (
    FLUX_CFG,
    KONTEXT_CFG,
    QWEN_CFG,
    QWEN_EDIT_CFG,
    ROOT,
    SD35L_CFG,
    TINY_FLUX,
    TINY_QWEN,
    run_json,
)


def test_model_files_come_from_the_family_entry():
    """Each family picks its shipped configs from policy.pretrained (SD3.5-Large no longer refused)."""
    from fastcps.plan.loader import model_files

    def stems(cfg_path, pretrained):
        cfg = load_config(RunConfig, str(cfg_path), [f"policy.pretrained={pretrained}"])
        return {k: v.name for k, v in model_files(cfg).items()}

    assert stems(SD35L_CFG, "stabilityai/stable-diffusion-3.5-large") == {
        "transformer": "sd3.5-large_transformer.json",
        "vae": "sd3.5_vae.json",
        "scheduler": "sd3.5-large_scheduler.json",
    }
    assert stems(SD35L_CFG, "stabilityai/stable-diffusion-3.5-medium")["transformer"] == (
        "sd3.5-medium_transformer.json"
    )
    assert stems(FLUX_CFG, "black-forest-labs/FLUX.1-schnell")["scheduler"] == "flux1-schnell_scheduler.json"
    assert stems(QWEN_CFG, "Qwen/Qwen-Image") == {
        "transformer": "qwen-image_transformer.json",
        "vae": "qwen-image_vae.json",
        "scheduler": "qwen-image_scheduler.json",
    }
    for files in (
        stems(SD35L_CFG, "stabilityai/stable-diffusion-3.5-large"),
        stems(QWEN_CFG, "Qwen/Qwen-Image"),
    ):
        for name in files.values():
            assert (ROOT / "configs" / "models" / name).is_file(), name


def test_flowcps_anchor_counts_cond_and_uncond_and_the_checkpointed_backward():
    """FlowCPS's pickscore_qwenimage_8gpu per image: 10 sampling steps of cond + uncond (2 samples),
    2 trained steps of one 2B forward each and its backward through the checkpointed blocks."""
    from types import SimpleNamespace

    from fastcps.plan.epoch import anchor_flop_per_image
    from fastcps.policies.plan_facts import FLOWCPS_QWENIMAGE, QwenImagePlan

    assert QwenImagePlan.anchor is FLOWCPS_QWENIMAGE
    seen = []

    def step(kind, b):  # per sample: forward 1, backward 10 (100 with checkpointing's re-forward)
        seen.append((kind, b))
        return SimpleNamespace(forward_flop=b, backward_flop=b * (100 if kind == "ckpt" else 10))

    out = anchor_flop_per_image(FLOWCPS_QWENIMAGE, SimpleNamespace(step=step), lambda b: 7.0 * b)
    assert seen == [("nograd", 8), ("ckpt", 8)]  # batch 4 images x 2 samples
    assert out["rollout"] == 10 * 2 and out["training forward"] == 2 * 2
    assert out["training backward"] == 2 * 2 * 100 and out["VAE decode"] == 7.0
    assert out["total"] == 20 + 4 + 400 + 7.0


def test_a_qwenimage_plan_reads_the_family(tmp_path):
    """The Qwen-Image recipe on a tiny QwenImageTransformer2DModel: true CFG doubles every call's samples,
    the transformer sees max_sequence_length text tokens (no pooled vector), the Qwen VAE decodes one frame,
    the Qwen2.5-VL-7B text encoder is counted at its published size, FlowCPS's recipe is the anchor."""
    tiny = tmp_path / "tiny_qwen.json"
    tiny.write_text(json.dumps(TINY_QWEN))
    r = run_json("--config", str(QWEN_CFG), "--world-size", "8", "--model-config", str(tiny))
    assert r["cfg_batch_multiplier"] == 2 and r["anchor"] == "FlowCPS pickscore_qwenimage_8gpu"
    assert Path(r["files"]["vae"]).name == "qwen-image_vae.json"
    assert r["images_per_rank"] == 64 and r["optimizer_steps"] == 2
    assert "rollout (nograd, 8 samples)" in r["calls_per_rank"]  # 4 images x (cond + uncond)
    text = r["memory"]["3"]["persistent"]
    assert text["text encoders"] == 0.0  # offload_frozen
    enc = r["memory"]["3"]["transients"]["prompt encoding"]["text encoders moved in"]
    assert enc == pytest.approx(8.29e9 * 2)
    assert r["activation_peak_bytes"]["vae_decode"] > 0


def test_flow_grpo_sd3_anchor_counts_cfg_and_the_kl_reference():
    """flow_grpo's geneval_sd3 per image: 10 sampling steps on 2 samples (true CFG), 9 trained steps
    (timestep_fraction 0.99) of forward + backward on 2 samples and the KL reference's no-grad forward."""
    from types import SimpleNamespace

    from fastcps.plan.epoch import anchor_flop_per_image
    from fastcps.policies.plan_facts import FLOW_GRPO_SD3, SD3Plan

    assert SD3Plan.anchor is FLOW_GRPO_SD3

    def step(kind, b):
        assert b == 18 and kind in ("nograd", "train")  # 9 images x 2 samples, no checkpointing
        return SimpleNamespace(forward_flop=b, backward_flop=10 * b)

    out = anchor_flop_per_image(FLOW_GRPO_SD3, SimpleNamespace(step=step), lambda b: 0.0)
    assert out["rollout"] == 10 * 2 and out["training forward"] == 9 * 2
    assert out["training backward"] == 9 * 2 * 10 and out["KL reference forward"] == 9 * 2


# --- FLUX.1 Kontext: the source image's tokens on every call ---------------------------------------------


def test_flowcps_kontext_anchor_counts_six_rollout_forwards_and_five_trained_steps():
    """FlowCPS's counting_flux_kontext per image: 6 sampling steps, int(6 x 0.99) = 5 trained steps of
    forward + backward, batch 3, no CFG, no checkpointing, no KL reference (beta 0)."""
    from types import SimpleNamespace

    from fastcps.plan.epoch import anchor_flop_per_image
    from fastcps.policies.plan_facts import FLOWCPS_KONTEXT, KontextPlan

    assert KontextPlan.anchor is FLOWCPS_KONTEXT
    seen = []

    def step(kind, b):
        seen.append((kind, b))
        return SimpleNamespace(forward_flop=b, backward_flop=10 * b)

    out = anchor_flop_per_image(FLOWCPS_KONTEXT, SimpleNamespace(step=step), lambda b: 7.0 * b)
    assert seen == [("nograd", 3), ("train", 3)]
    assert out["rollout"] == 6 and out["training forward"] == 5 and out["training backward"] == 50
    assert "KL reference forward" not in out and out["total"] == 6 + 5 + 50 + 7.0


def test_a_kontext_plan_prices_the_source_tokens(tmp_path):
    """The Kontext recipe on a tiny FluxTransformer2DModel: every call carries the target's and the source
    image's tokens (2 x 1024 at 512 px), so a forward costs more than FLUX's on the same transformer, text
    and batch (the attention more than doubles); the anchor is FlowCPS's and is priced on the same inputs;
    the rollout keeps the target's latent only; FLUX.1-dev's shipped configs serve (the same architecture)."""
    tiny = tmp_path / "tiny_flux.json"
    tiny.write_text(json.dumps(TINY_FLUX))
    common = ["--world-size", "8", "--model-config", str(tiny), "--set", "policy.max_sequence_length=128"]
    kontext = run_json("--config", str(KONTEXT_CFG), *common)
    flux = run_json("--config", str(FLUX_CFG), *common)
    assert kontext["anchor"] == "FlowCPS counting_flux_kontext"
    assert {k: Path(v).name for k, v in kontext["files"].items()} == {
        "transformer": "tiny_flux.json",
        "vae": "flux1_vae.json",
        "scheduler": "flux1-dev_scheduler.json",
    }
    ratio = kontext["forward_flop_per_image"] / flux["forward_flop_per_image"]
    assert 2.0 < ratio < 4.0, ratio  # linear layers x 2176/1152 tokens, attention x (2176/1152)^2
    assert kontext["images_per_rank"] == 126 and kontext["optimizer_steps"] == 2
    assert kontext["anchor_ratio"] == pytest.approx(1.0, abs=1e-9)  # the anchor's calls, priced alike


def test_a_qwenimage_edit_plan_prices_the_reference_tokens(tmp_path):
    """The Qwen-Image-Edit recipe on a tiny QwenImageTransformer2DModel: every call carries the reference's
    64 x 64 tokens after the target's and the VL text with the reference's 1369 image tokens; FlowCPS's
    counting_qwenimage_edit_8gpu is the anchor, true CFG doubles the samples."""
    from fastcps.policies.plan_facts import FLOWCPS_QWENIMAGE_EDIT, QwenImageEditPlan

    assert QwenImageEditPlan.text_tokens(32) == 37 * 37 + 7 + 32
    inputs = QwenImageEditPlan.inputs(TINY_QWEN, 2, 512, 40, torch.float32)
    assert inputs["hidden_states"].shape == (2, 32 * 32 + 64 * 64, 64)
    assert inputs["img_shapes"] == [[(1, 32, 32), (1, 64, 64)]] * 2
    tiny = tmp_path / "tiny_qwen.json"
    tiny.write_text(json.dumps(TINY_QWEN))
    r = run_json("--config", str(QWEN_EDIT_CFG), "--world-size", "8", "--model-config", str(tiny))
    assert r["anchor"] == FLOWCPS_QWENIMAGE_EDIT.name and QwenImageEditPlan.anchor is FLOWCPS_QWENIMAGE_EDIT
    assert r["cfg_batch_multiplier"] == 2 and "rollout (nograd, 8 samples)" in r["calls_per_rank"]
    assert r["images_per_rank"] == 64 and r["optimizer_steps"] == 2


def test_the_vl_image_tokens_the_plan_prices_are_what_transformers_processor_makes():
    """The reference's Qwen2.5-VL image tokens (plan_facts.EDIT_IMAGE_TOKENS) counted by transformers' own
    Qwen2VLImageProcessor at Qwen-Image-Edit's processor settings (Qwen2.5-VL's: 14 px patches merged 2 x 2,
    3136 to 12845056 pixels) on the 1024 x 1024 picture QwenImageEditPipeline hands it
    (calculate_dimensions(1024 * 1024, 1))."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from fastcps.policies.plan_facts import EDIT_IMAGE_TOKENS, EDIT_REFERENCE_SIDE

    pixels = dict(min_pixels=3136, max_pixels=12845056)
    processor = Qwen2VLImageProcessor(
        **pixels, size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=14, merge_size=2
    )
    grid = processor(images=[Image.new("RGB", (1024, 1024))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 2**2 == EDIT_IMAGE_TOKENS  # one token per 2 x 2 merged patches
    assert EDIT_REFERENCE_SIDE * 16 == 1024


def test_the_32_gpu_qwenimage_edit_recipe_is_priced_against_its_own_anchor(tmp_path):
    """FlowCPS has two Qwen-Image-Edit recipes: the 8-GPU one trains 2 window steps per image, the 32-GPU
    one (counting_qwenimage_edit) 9 of its 10 steps. Each config is compared with the recipe it copies
    (the same 512 images an epoch, so the same anchor FLOPs per image would make the 32-GPU config look
    4.5x dearer than it is); a config that matches neither is compared with the family's first."""
    from fastcps.policies.plan_facts import (
        FLOWCPS_QWENIMAGE_EDIT,
        FLOWCPS_QWENIMAGE_EDIT_32GPU,
        QwenImageEditPlan,
    )

    assert QwenImageEditPlan.anchor_for(10, 9) is FLOWCPS_QWENIMAGE_EDIT_32GPU
    assert QwenImageEditPlan.anchor_for(10, 2) is FLOWCPS_QWENIMAGE_EDIT
    assert QwenImageEditPlan.anchor_for(10, 3) is FLOWCPS_QWENIMAGE_EDIT
    tiny = tmp_path / "tiny_qwen.json"
    tiny.write_text(json.dumps(TINY_QWEN))
    cfg32 = ROOT / "configs" / "qwenimage_edit_counting_32gpu.json"
    ckpt = ("--set", "policy.gradient_checkpointing=true")  # as both anchors run
    r = run_json("--config", str(cfg32), "--world-size", "32", "--model-config", str(tiny), *ckpt)
    assert r["anchor"] == "FlowCPS counting_qwenimage_edit" and r["trained_steps_range"] == [9, 9]
    assert r["anchor_recipe"]["trained_steps"] == 9 and r["optimizer_steps"] == 2
    assert r["images_per_rank"] == 16
    assert r["anchor_ratio"] == pytest.approx(1.0, abs=1e-3), r["anchor_ratio"]
    r8 = run_json("--config", str(QWEN_EDIT_CFG), "--world-size", "8", "--model-config", str(tiny), *ckpt)
    assert r8["anchor"] == FLOWCPS_QWENIMAGE_EDIT.name
    assert r8["anchor_ratio"] == pytest.approx(1.0, abs=1e-3), r8["anchor_ratio"]
