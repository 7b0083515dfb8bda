"""The `kontext` policy (FLUX.1 Kontext [dev], editing) on a tiny random-weight FluxKontextPipeline
(fastcps.testing.kontext): at eta = 0 fastcps's sampler reproduces the stock pipeline's edit of two source
images (the source's packed VAE latents appended on the token axis with RoPE ids (1, row, col), the output
cut to the target's tokens, guidance 2.5, the dynamic shift from the target's tokens alone), the prompt
cache encodes each (instruction, image) once, the exported LoRA loads in the stock pipeline, the default
LoRA targets are FlowCPS's on the real architecture and the recipe config is FlowCPS's. The trainer's epoch
and the full-size run on fake CUDA: tests/test_kontext_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_support import assert_exported_lora_loads_in_stock

from fastcps.conditioning import PromptEncodings, select
from fastcps.config import PolicyConfig
from fastcps.edit_images import SOURCE_IMAGES, load_image
from fastcps.policies import build_policy
from fastcps.rollout import sample, sampling_steps
from fastcps.testing.kontext import save_source_images, save_tiny_kontext

ROOT = Path(__file__).resolve().parent.parent
RES, SEQ = 64, 32
PROMPTS = ["Change the number of cats to two.", "make the bus red"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_kontext(root / "kontext"), save_source_images(root / "images", count=2, size=80)


def kontext_policy(path, dtype="fp32", **kw):
    cfg = PolicyConfig(
        name="kontext", pretrained=str(path), dtype=dtype, resolution=RES, max_sequence_length=SEQ, **kw
    )
    return build_policy(cfg, "cpu")


def rows(images):
    return [{SOURCE_IMAGES: [str(p)]} for p in images]


def stock(path):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_levels(ours, ref):
    """Our decode is the pipeline's image at the 8-bit levels the rewards score; sampling agrees to ~1e-6,
    so a level may differ by one where the pipeline's value lies that close to a rounding edge."""
    ref = (ref.float() * 255).round().clamp(0, 255) / 255
    assert torch.equal(ours * 255, (ours * 255).round())
    torch.testing.assert_close(ours, ref, atol=1 / 255 + 1e-6, rtol=0)
    assert float((ours != ref).float().mean()) < 1e-3


def ode_sample(policy, prompts, meta, x1, n):
    # the trainer's path: the prompt cache, then the rows' conditioning
    cond, index = PromptEncodings(policy).for_prompts(prompts, torch.device("cpu"), meta)
    cond = select(cond, index)
    steps = sampling_steps("cps", 0.0, policy.sigmas(n))  # CPS at eta = 0: the Euler step
    return sample(policy, policy.transformer, cond, x1.clone(), steps).final


# --- the policy is the pipeline ------------------------------------------------------------------------


def test_ode_sampling_reproduces_flux_kontext_pipeline(tiny):
    """fastcps's sampler at eta = 0 on the policy's velocity and schedule gives FluxKontextPipeline's latents
    within 1e-5 and its image at the 8-bit levels, in fp32, two instructions on two different source images
    in one batch. The pipeline is called as FlowCPS calls it: the source at the run's resolution
    (``max_area=res²``, no auto-resize to Kontext's preferred 1024 px), guidance 2.5, our x1 as its
    latents; the images are what ``load_image`` makes of the files (FlowCPS's PIL resize)."""
    path, images = tiny
    n = 4
    policy = kontext_policy(path)
    assert policy.editing and policy.guidance == 2.5 and policy.latent_shape() == (16, 64)
    x1 = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    ours = ode_sample(policy, PROMPTS, rows(images), x1, n)
    decoded = policy.decode(ours)

    pipe = stock(path)
    final = {}

    def keep(pipe, i, t, kw):
        final["latents"] = kw["latents"]
        return kw

    ref = pipe(
        image=torch.stack([load_image(str(p), RES) for p in images]),
        prompt=PROMPTS,
        height=RES,
        width=RES,
        max_area=RES * RES,
        _auto_resize=False,
        num_inference_steps=n,
        guidance_scale=2.5,
        latents=x1.clone(),
        max_sequence_length=SEQ,
        output_type="pt",
        callback_on_step_end=keep,
    ).images
    torch.testing.assert_close(ours, final["latents"], atol=1e-5, rtol=0)
    assert decoded.shape == (2, 3, RES, RES)
    assert_same_levels(decoded, ref)
    torch.testing.assert_close(policy.sigmas(n)[:-1], pipe.scheduler.sigmas[:-1].float())
    # the source image steers the edit: the same noise and instructions on swapped sources differ
    swapped = ode_sample(policy, PROMPTS, rows(images[::-1]), x1, n)
    assert float((swapped - ours).abs().max()) > 1e-2


def test_source_latents_are_the_pipelines(tiny):
    """encode's ``image_latents`` are FluxKontextPipeline.prepare_latents' packed source latents (the VAE's
    mode, ``(z - shift) · scale``), and the velocity's RoPE ids are the target's then the source's with the
    first coordinate 1 (prepare_latents' image_ids)."""
    path, images = tiny
    policy = kontext_policy(path)
    cond = policy.encode(PROMPTS, rows(images))
    pipe = stock(path)
    pixels = pipe.image_processor.preprocess(torch.stack([load_image(str(p), RES) for p in images]), RES, RES)
    _, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        pixels, 2, 16, RES, RES, torch.float32, torch.device("cpu"), None, torch.zeros(2, 16, 64)
    )
    torch.testing.assert_close(cond["image_latents"], image_latents, atol=1e-6, rtol=0)
    assert torch.equal(policy.joint_ids, torch.cat([latent_ids, image_ids]))
    assert image_ids[:, 0].eq(1).all() and latent_ids[:, 0].eq(0).all()


def test_prompt_cache_encodes_each_instruction_and_image_once(tiny):
    """The cache keys an encoding on (instruction, source image): the same instruction on two images is
    encoded twice, the same pair asked again (in the same call or a later one) not at all."""
    path, images = tiny
    policy = kontext_policy(path)
    encoded = []
    encode = policy.encode_images
    policy.encode_images = lambda pixels: encoded.append(pixels.shape[0]) or encode(pixels)
    cache = PromptEncodings(policy)
    same = [PROMPTS[0]] * 3
    meta = rows([images[0], images[1], images[0]])
    cond, index = cache.for_prompts(same, torch.device("cpu"), meta)
    assert encoded == [2] and index.tolist() == [0, 1, 0] and cond["image_latents"].shape[0] == 2
    assert not torch.equal(cond["image_latents"][0], cond["image_latents"][1])
    cache.for_prompts(same[:1], torch.device("cpu"), meta[:1])
    assert encoded == [2]


def test_rows_without_one_source_image_are_refused(tiny):
    path, images = tiny
    policy = kontext_policy(path)
    with pytest.raises(ValueError, match="has no source image"):
        policy.encode(PROMPTS[:1], [{}])
    with pytest.raises(ValueError, match="has 2 source images"):
        policy.encode(PROMPTS[:1], [{SOURCE_IMAGES: [str(p) for p in images]}])
    x = torch.zeros(1, *policy.latent_shape())
    text_only = {
        k: v for k, v in policy.encode(PROMPTS[:1], rows(images[:1])).items() if k != "image_latents"
    }
    with pytest.raises(ValueError, match="image_latents"):
        policy.velocity(policy.transformer, x, 0.5, text_only)


def test_lora_export_loads_in_stock_flux_kontext_pipeline(tiny, tmp_path):
    """The trained adapters (FlowCPS's targets, proj_mlp included), exported as the trainer exports them,
    load with FluxKontextPipeline's ``load_lora_weights`` and give the trained policy's velocity; adapters
    off = the base."""
    from fastcps.config import LoraConfig

    path, images = tiny
    policy = kontext_policy(path, lora=LoraConfig(r=4, alpha=8.0))
    cond = policy.encode(PROMPTS, rows(images))
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.7, 0.3])
    named = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert len(named) == 2 * (12 + 4)  # (A, B) x (one double block's 12 targets + one single block's 4)
    assert any(".proj_mlp." in n for n in named)
    assert_exported_lora_loads_in_stock(policy, x, s, cond, stock(path), tmp_path)


def test_fetch_takes_the_pipeline_subfolders_only():
    """``python -m fastcps.fetch`` for the recipe: FLUX.1-Kontext-dev's diffusers subfolders and
    model_index.json, not the repo root's single-file checkpoint (flux1-kontext-dev.safetensors, which the
    subfolders duplicate), then the rewards' models and the counting_edit sets with their source images."""
    from fastcps.config import RunConfig, load_config
    from fastcps.fetch.items import EditImages, HubRepo
    from fastcps.fetch.needs import config_items

    cfg = load_config(RunConfig, str(ROOT / "configs" / "kontext_counting.json"))
    items = config_items(cfg)
    policy = items[0]
    assert isinstance(policy, HubRepo) and policy.repo_id == "black-forest-labs/FLUX.1-Kontext-dev"
    assert policy.key == "policy.pretrained" and "model_index.json" in policy.allow_patterns
    assert not any(p.endswith(".safetensors") or p == "*" for p in policy.allow_patterns)
    assert {"transformer/*", "vae/*", "text_encoder_2/*", "scheduler/*"} <= set(policy.allow_patterns)
    assert [i.source for i in items if isinstance(i, EditImages)] == [
        "counting_edit:train",
        "counting_edit:test",
    ]
    keys = {i.key.split(".args.")[0] for i in items}
    assert {"rewards.0", "rewards.1"} <= keys


# --- the recipe's pieces --------------------------------------------------------------------------------

# FlowCPS's list, transcribed (IamCreateAI/FlowCPS scripts/train_flux_kontext.py, target_modules)
FLOWCPS_KONTEXT = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
]


def test_default_lora_targets_are_flowcps_modules_on_the_real_architecture():
    """FLUX.1 Kontext [dev] is FLUX.1-dev's 12 B transformer: 19 double blocks with FLUX's 12 targets each and
    38 single blocks with attn.to_q/k/v and proj_mlp: 19 x 12 + 38 x 4 = 380 adapted modules."""
    from diffusers import FluxTransformer2DModel

    from fastcps.policies.kontext import FluxKontextPolicy

    assert list(FluxKontextPolicy.default_lora_targets) == FLOWCPS_KONTEXT
    mc = json.loads((ROOT / "configs" / "models" / "flux1-dev_transformer.json").read_text())
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in mc.items() if not k.startswith("_")})
    p = FluxKontextPolicy.__new__(FluxKontextPolicy)  # the LoRA part only: no weights to load
    p.transformer = model
    p.add_lora(4, 8.0)
    got = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    want = {f"transformer_blocks.{i}.{t}" for i in range(19) for t in FLOWCPS_KONTEXT[:12]}
    want |= {f"single_transformer_blocks.{i}.{t}" for i in range(38) for t in single}
    assert got == want and len(got) == 380


def test_the_recipe_config_is_flowcps_counting_flux_kontext():
    """configs/kontext_counting.json: FlowCPS's counting_flux_kontext (6 steps with 5 trained, CPS eta 0.9,
    guidance 2.5, 512 px, K = 21, 48 prompts per epoch, clip 1e-4, global advantage std, LoRA r 64 on the
    family's targets, 0.5 image_similarity + 0.5 geneval on counting_edit) loads and validates on 1 to 8
    GPUs; its eval rows carry one source image each and GenEval's counting fields."""
    from fastcps.config import RunConfig, load_config, validate_tree
    from fastcps.prompts import load_prompts
    from fastcps.schedule import pipeline_sigmas

    cfg = load_config(RunConfig, str(ROOT / "configs" / "kontext_counting.json"))
    for world in (1, 2, 4, 8):
        validate_tree(cfg, world_size=world)
    p, s, t = cfg.policy, cfg.sampler, cfg.train
    assert (p.name, p.resolution, p.guidance, p.dtype, p.max_sequence_length) == (
        "kontext",
        512,
        2.5,
        "bf16",
        128,
    )
    assert p.lora.r == 64 and p.lora.alpha == 128.0 and not p.lora.target_modules
    assert (s.name, s.eta, s.num_steps) == ("cps", 0.9, 6)
    assert (t.prompts_per_epoch, t.images_per_prompt, t.clip_range, t.adv_std, t.beta_kl) == (
        48,
        21,
        1e-4,
        "global",
        0.0,
    )
    assert [(r.name, r.weight) for r in cfg.rewards] == [("image_similarity", 0.5), ("geneval", 0.5)]
    sched = json.loads((ROOT / "configs" / "models" / "flux1-dev_scheduler.json").read_text())
    steps = sampling_steps(s.name, s.eta, pipeline_sigmas(sched, 1024, s.num_steps))
    assert steps.trained == [0, 1, 2, 3, 4]  # FlowCPS: int(6 x 0.99) = 5, the first ones
    prompts, meta = load_prompts(cfg.prompts.eval_source)
    assert len(prompts) == 112 and all(len(m[SOURCE_IMAGES]) == 1 and m["tag"] == "counting" for m in meta)
