"""The `qwenimage_edit` policy on a tiny random-weight QwenImageEditPipeline (fastcps.testing.qwenimage_edit):
at eta = 0 fastcps's sampler reproduces the stock pipeline's edit (the source image through the VL encoder
and as reference tokens after the target's, ``img_shapes = [target, reference]``, the output cut to the
target, true CFG with the negative prompt encoded with the same image), and the prompt cache encodes one
instruction on two images twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from fastcps.conditioning import PromptEncodings, select
from fastcps.config import PolicyConfig
from fastcps.edit_images import SOURCE_IMAGES, load_image_uint8
from fastcps.policies import build_policy
from fastcps.rollout import sample, sampling_steps
from fastcps.testing.qwenimage_edit import save_tiny_qwenimage_edit

ROOT = Path(__file__).resolve().parent.parent
RES = 64
PROMPTS = ["a cat", "a red bus by the sea at night"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_qwenimage_edit(tmp_path_factory.mktemp("tiny") / "qwenimage_edit")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two source images of another size than the policy's (the load resizes them), different content."""
    folder = tmp_path_factory.mktemp("src")
    g = torch.Generator().manual_seed(5)
    paths = []
    for i, size in enumerate([(80, 72), (96, 96)]):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(str(folder / f"src{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def edit_policy(path, **kw):
    cfg = PolicyConfig(name="qwenimage_edit", pretrained=str(path), dtype="fp32", resolution=RES, **kw)
    return build_policy(cfg, "cpu")


def pil(path):
    """The source as FlowCPS hands it to the pipeline: resized to the resolution (load_image's pixels)."""
    return Image.fromarray(load_image_uint8(path, RES).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("cfg_scale", [4.0, None], ids=["true_cfg", "no_cfg"])
def test_ode_sampling_reproduces_qwenimage_edit_pipeline(tiny, sources, cfg_scale):
    """fastcps's sampler at eta = 0 on the policy gives QwenImageEditPipeline's latents within 1e-5: two
    instructions of different lengths on two images in one batch, through the trainer's prompt cache."""
    from diffusers import QwenImageEditPipeline

    n = 3
    policy = edit_policy(tiny, cfg_scale=cfg_scale)
    assert policy.editing and policy.reference_tokens == 64 * 64  # a 1024 px reference, 16 px a token
    meta = [{SOURCE_IMAGES: [p]} for p in sources]
    cond, index = PromptEncodings(policy).for_prompts(PROMPTS, torch.device("cpu"), meta)
    cond = select(cond, index)
    assert ("negative_encoder_hidden_states" in cond) == (cfg_scale is not None)
    x1 = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    ours = sample(
        policy, policy.transformer, cond, x1.clone(), sampling_steps("cps", 0.0, policy.sigmas(n))
    ).final

    pipe = QwenImageEditPipeline.from_pretrained(tiny)
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(pipe, i, t, kw):
        final["latents"] = kw["latents"]
        return kw

    # a list of images passes VaeImageProcessor.resize unchanged, so the VL model would read them at the
    # resolution where one image is read at the area target's 1024 px: give the list at 1024 px (what the
    # pipeline makes of each image alone; the single-image call below checks that it is)
    pipe(
        image=[pipe.image_processor.resize(pil(p), 1024, 1024) for p in sources],
        prompt=PROMPTS,
        negative_prompt=[" "] * 2 if cfg_scale else None,
        true_cfg_scale=cfg_scale or 1.0,
        height=RES,
        width=RES,
        num_inference_steps=n,
        latents=x1.clone(),
        output_type="latent",
        callback_on_step_end=keep,
    )
    torch.testing.assert_close(ours, final["latents"], atol=1e-5, rtol=0)
    assert policy.decode(ours).shape == (2, 3, RES, RES)
    if cfg_scale is None:  # the pipeline's own resize on one image, the row's pixels as FlowCPS loads them
        pipe(
            image=pil(sources[1]),
            prompt=PROMPTS[1],
            height=RES,
            width=RES,
            num_inference_steps=n,
            latents=x1[1:].clone(),
            output_type="latent",
            callback_on_step_end=keep,
        )
        torch.testing.assert_close(ours[1:], final["latents"], atol=1e-5, rtol=0)


def test_same_instruction_on_two_images_encodes_twice(tiny, sources):
    """The cache keys an edit on (instruction, image): one instruction on two images is two encodings (with
    different reference latents), the same pair twice is one."""
    policy = edit_policy(tiny, cfg_scale=4.0)
    calls = []
    encode = policy.encode
    policy.encode = lambda prompts, metadata=None: calls.append(len(prompts)) or encode(prompts, metadata)
    cache = PromptEncodings(policy)
    meta = [{SOURCE_IMAGES: [sources[0]]}, {SOURCE_IMAGES: [sources[1]]}, {SOURCE_IMAGES: [sources[0]]}]
    cond, index = cache.for_prompts(["a cat"] * 3, torch.device("cpu"), meta)
    assert calls == [2] and index.tolist() == [0, 1, 0]
    assert not torch.allclose(cond["image_latents"][0], cond["image_latents"][1])
    assert not torch.allclose(
        cond["negative_encoder_hidden_states"][0], cond["negative_encoder_hidden_states"][1]
    )
    with pytest.raises(ValueError, match="no source image"):
        policy.encode(["a cat"], [{}])


# --- the full-size architecture on fake CUDA -------------------------------------------------------------


@pytest.mark.slow
def test_qwenimage_edit_recipe_at_full_size_on_fake_cuda(tiny):
    """configs/qwenimage_edit_counting.json at Qwen-Image-Edit's real size: the 20.4 B-parameter transformer
    (no weights: meta, then fake CUDA), LoRA r 64, bf16, gradient checkpointing, 512 px target (1024 tokens)
    with the 1024 px reference's 4096 tokens after it in every call, true CFG 4 with each prompt's own
    negative, Qwen2.5-VL-7B-sized states holding 1369 image tokens. Rollout, advantages and a training
    micro-step stay on the device, with no host sync in the micro-step."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_cuda import fake_policy, rollout_and_micro_step
    from test_qwenimage import HostReward, real_transformer
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastcps.config import RunConfig, load_config
    from fastcps.rollout import epoch_steps

    cuda = torch.device("cuda")
    sets = [
        f"policy.pretrained={tiny}",
        "policy.offload_frozen=false",
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=2",
        "train.rollout_batch_size=4",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=2",
        "sampler.sde_window_range=[0, 1]",
    ]
    cfg = load_config(RunConfig, str(ROOT / "configs" / "qwenimage_edit_counting.json"), sets)
    policy = build_policy(cfg.policy, "cpu")  # tiny encoder and VAE; the transformer is replaced below
    policy.transformer = real_transformer().to(torch.bfloat16)
    policy.transformer.enable_gradient_checkpointing()
    policy.add_lora(cfg.policy.lora.r, cfg.policy.lora.alpha)
    assert policy.latent_shape() == (1024, 64) and policy.reference_tokens == 4096
    sampling = epoch_steps(cfg, 0, policy)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_policy(policy, mode, cuda)
    width, text = 3584, 37 * 37 + 7 + 12  # Qwen2.5-VL-7B: image tokens + template + instruction

    def encode(prompts, metadata=None):
        n, bf16 = len(prompts), torch.bfloat16
        return {
            "encoder_hidden_states": torch.zeros(n, text, width, dtype=bf16, device=cuda),
            "negative_encoder_hidden_states": torch.zeros(n, text - 11, width, dtype=bf16, device=cuda),
            "image_latents": torch.zeros(n, 4096, 64, dtype=bf16, device=cuda),
        }

    policy.encode = encode
    seen = []  # the image tokens of every transformer call: [target; reference]
    img_in = next(m for n, m in policy.transformer.named_modules() if n.endswith("img_in"))
    img_in.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    pool = (["Change the number of cat to two.", "Change the number of bus to one."], [])
    pool = (pool[0], [{SOURCE_IMAGES: [f"/src/{i}.png"]} for i in range(2)])
    with mode:
        data, out, logp = rollout_and_micro_step(
            cfg, sampling, policy, HostReward(), PromptEncodings(policy), pool, cuda, 4
        )
    assert data.x_t.shape == (4, 2, 1024, 64) and data.preview.shape[1:] == (3, 512, 512)
    for t in (data.x_t, data.log_prob, out.loss, logp):
        assert t.device.type == "cuda"
    assert out.loss.requires_grad
    assert seen and {n for _, n in seen} == {1024 + 4096}  # rollout (8 samples) and micro-step (4) alike


def test_the_fetcher_takes_the_processor():
    """Qwen/Qwen-Image-Edit's processor/ (the VL image processor the encoder reads the source through) is
    among the subfolders the fetcher downloads, with Qwen-Image's."""
    from fastcps.fetch.needs import policy_items

    cfg = PolicyConfig(name="qwenimage_edit", pretrained="Qwen/Qwen-Image-Edit")
    (item,) = policy_items(cfg)
    assert "processor/*" in item.allow_patterns and "text_encoder/*" in item.allow_patterns
