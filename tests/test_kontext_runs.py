"""The `kontext` policy's runs (slow): one GRPO epoch of configs/kontext_counting.json on edit rows through
the trainer (two processes, ZeRO-3) then ``fastcps.sample`` on the run, and the recipe at FLUX.1 Kontext's
full size on fake CUDA. The equality with the stock pipeline and the recipe's pieces: tests/test_kontext.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kontext import PROMPTS, RES, ROOT, SEQ, stock

from fastcps.conditioning import PromptEncodings
from fastcps.edit_images import SOURCE_IMAGES
from fastcps.policies import build_policy
from fastcps.testing.kontext import save_source_images, save_tiny_kontext


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_kontext(root / "kontext"), save_source_images(root / "images", count=2, size=80)


# --- the trainer: one GRPO epoch on edit rows, ZeRO-3, 2 processes --------------------------------------


@pytest.mark.slow
def test_one_grpo_epoch_of_the_recipe_on_edit_rows_zero3_two_processes(tiny, tmp_path):
    """configs/kontext_counting.json on the tiny pipeline and a .jsonl of edit rows (two instructions on two
    source images, relative paths): two ranks run an epoch through the trainer (the rows checked to fit the
    editing policy, the prompt cache keyed on (instruction, image), the source tokens in rollout and
    update, ZeRO-3), the ratio starts at 1, and the saved adapter loads in stock FluxKontextPipeline."""
    from multi_run import launch
    from safetensors.torch import load_file

    path, images = tiny
    (tmp_path / "img").mkdir()
    for i in images:  # relative paths resolve against the prompt file's folder
        shutil.copy(i, tmp_path / "img" / Path(i).name)
    rows_file = tmp_path / "edits.jsonl"
    rows_file.write_text(
        "".join(
            json.dumps({"prompt": p, "image": f"img/{Path(i).name}"}) + "\n" for p, i in zip(PROMPTS, images)
        )
    )
    sets = [
        f"policy.pretrained={path}",
        f"prompts.source={rows_file}",
        f"prompts.eval_source={rows_file}",
        "policy.dtype=fp32",
        f"policy.resolution={RES}",
        f"policy.max_sequence_length={SEQ}",
        'policy.lora={"r": 4, "alpha": 8.0}',
        "policy.offload_frozen=false",
        f"rewards={json.dumps([{'name': 'jpeg_compressibility'}])}",
        "sampler.num_steps=4",
        "train.num_epochs=1",
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=4",
        "train.rollout_batch_size=2",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.micro_batch=null",
        "eval.every=0",
        "log.progress=false",
        "checkpoint.every=0",
        f"output_dir={tmp_path}",
        "name=kontext",
    ]
    config = ["--config", str(ROOT / "configs" / "kontext_counting.json")]
    launch([config + [a for kv in sets for a in ("--set", kv)]], world=2, timeout=400)
    run = tmp_path / "kontext"
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["train/ratio_dev"] == 0.0 and last["train/loss"] == last["train/loss"]  # finite, not NaN
    final = run / "checkpoints" / "final"
    trained = load_file(str(final / "policy.safetensors"))
    assert trained and all("lora_" in k for k in trained)
    assert any("proj_mlp" in k for k in trained)
    assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k)  # it moved
    pipe = stock(path)
    pipe.load_lora_weights(final)
    # the run's images, base beside trained, with each prompt's source image: fastcps.sample on the run
    grid = tmp_path / "grid.png"
    argv = ["--run", str(run), "--out", str(grid), "--images-per-prompt", "1", "--steps", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "fastcps.sample", *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = sorted(f.name for f in (tmp_path / "grid_images").iterdir())
    assert shown == [f"p0{i}_{row}_0.png" for i in (0, 1) for row in ("base", "source", "trained")]


# --- the full-size architecture on fake CUDA -------------------------------------------------------------


class HostReward:
    """One fp32 score per image, on the CPU (as tests/test_virtual_cuda.py's)."""

    parts = [("host", 1.0, None)]

    def __call__(self, images, prompts, metadata):
        from fastcps.rewards import RewardOutput

        assert images.device.type == "cuda" and images.shape[:2] == (len(prompts), 3), images
        assert all(len(m[SOURCE_IMAGES]) == 1 for m in metadata)  # the edit rows' metadata reaches rewards
        r = torch.rand(len(prompts))
        return RewardOutput(r, {"host": r})


@pytest.mark.slow
def test_kontext_recipe_at_full_size_on_fake_cuda(tiny):
    """configs/kontext_counting.json at FLUX.1 Kontext's real size: the 11.9 B-parameter transformer built
    from configs/models/flux1-dev_transformer.json (the same architecture; no weights: meta, then fake
    CUDA), LoRA r 64 on FlowCPS's 380 modules, bf16, gradient checkpointing, 512 px: 1024 target tokens
    plus the source's 1024 on every call (the bf16 reference latents from the prompt cache), 128 T5 tokens,
    6 steps with 5 trained. Rollout, advantages and a training micro-step all stay on the device, with no
    host sync in the micro-step."""
    from fake_cuda import fake_policy, full_size_transformer, rollout_and_micro_step
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastcps.config import RunConfig, load_config
    from fastcps.prompts import load_prompts
    from fastcps.rollout import epoch_steps

    cuda = torch.device("cuda")
    path, _ = tiny
    sets = [
        f"policy.pretrained={path}",
        "policy.offload_frozen=false",
        "train.prompts_per_epoch=1",
        "train.images_per_prompt=2",
        "train.rollout_batch_size=2",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=1",
    ]
    cfg = load_config(RunConfig, str(ROOT / "configs" / "kontext_counting.json"), sets)
    policy = build_policy(cfg.policy, "cpu")  # tiny encoders and VAE; the transformer is replaced below
    assert full_size_transformer(policy, "kontext", "flux1-dev_transformer.json", cfg.policy.lora) > 11.9e9
    adapted = {n for n, m in policy.transformer.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == 380 and policy.guidance == 2.5 and policy.latent_shape() == (1024, 64)
    sampling = epoch_steps(cfg, 0, policy)
    assert sampling.trained == [0, 1, 2, 3, 4]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_policy(policy, mode, cuda)
    assert policy.joint_ids.shape == (2048, 3) and policy.joint_ids.device.type == "cuda"
    seq = cfg.policy.max_sequence_length
    calls = []

    def encode(prompts, metadata=None):  # T5-XXL, CLIP-L and the source's packed latents at 512 px
        calls.append([m[SOURCE_IMAGES] for m in metadata])
        n = len(prompts)
        return {
            "encoder_hidden_states": torch.zeros(n, seq, 4096, dtype=torch.bfloat16, device=cuda),
            "pooled_projections": torch.zeros(n, 768, dtype=torch.bfloat16, device=cuda),
            "image_latents": torch.zeros(n, 1024, 64, dtype=torch.bfloat16, device=cuda),
        }

    policy.encode = encode
    seen = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape, kw["img_ids"].shape)), with_kwargs=True
    )
    with mode:
        data, out, logp = rollout_and_micro_step(
            cfg,
            sampling,
            policy,
            HostReward(),
            PromptEncodings(policy),
            load_prompts(cfg.prompts.source),
            cuda,
            2,
        )
    hook.remove()
    assert len(calls) == 1 and len(calls[0]) == 1  # one (instruction, image) pair, encoded once
    assert seen and all(s == ((2, 2048, 64), (2048, 3)) for s in seen)
    assert data.x_t.shape == (2, 5, 1024, 64) and data.preview.shape[1:] == (3, 512, 512)
    for t in (data.x_t, data.log_prob, out.loss, logp):
        assert t.device.type == "cuda"
    assert out.loss.requires_grad
