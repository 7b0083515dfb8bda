"""The `qwenimage` policy on a tiny random-weight QwenImagePipeline (fastcps.testing.qwenimage): at eta = 0
fastcps's sampler reproduces the stock pipeline's image (true CFG with its per-token norm rescale, prompts
of different lengths in one batch, the VAE's normalisation), the transformer gets the pipeline's timestep
bit for bit in bf16, encode drops the chat template's 34 tokens as ``encode_prompt`` does, the default
LoRA targets are FlowCPS's on the real 60-block architecture, and the full-size architecture runs a
training step on fake CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_support import assert_exported_lora_loads_in_stock

from fastcps.config import PolicyConfig
from fastcps.policies import build_policy
from fastcps.rewards import RewardOutput
from fastcps.conditioning import PromptEncodings, select
from fastcps.rollout import sample, sampling_steps
from fastcps.testing.qwenimage import QWENIMAGE_SCHEDULER, save_tiny_qwenimage

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64  # Qwen tokens after the template; the prompts here have fewer
PROMPTS = ["a cat", "a red bus by the sea at night"]  # 7 and 22 tokens: one batch needs padding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_qwenimage(tmp_path_factory.mktemp("tiny") / "qwenimage")


def qwen_policy(path, dtype="fp32", **kw):
    cfg = PolicyConfig(
        name="qwenimage", pretrained=str(path), dtype=dtype, resolution=64, max_sequence_length=SEQ, **kw
    )
    return build_policy(cfg, "cpu")


def stock(path, dtype=torch.float32):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_levels(ours, ref):
    """Our decode is the pipeline's image at the 8-bit levels the rewards score; sampling agrees to ~1e-6,
    so a level may differ by one where the pipeline's value lies that close to a rounding edge."""
    ref = (ref.float() * 255).round().clamp(0, 255) / 255
    assert torch.equal(ours * 255, (ours * 255).round())
    torch.testing.assert_close(ours, ref, atol=1 / 255 + 1e-6, rtol=0)
    assert float((ours != ref).float().mean()) < 1e-3


# --- the policy is the pipeline ------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [4.0, None], ids=["true_cfg", "no_cfg"])
def test_ode_sampling_reproduces_qwenimage_pipeline(tiny, cfg_scale):
    """fastcps's own sampler (CPS at eta = 0 is the Euler step) on the policy's velocity and schedule gives
    QwenImagePipeline's latents within 1e-5 and its image at the 8-bit levels, in fp32, two prompts of
    different lengths in one batch (the shorter one padded, with its mask)."""
    n = 4
    policy = qwen_policy(tiny, cfg_scale=cfg_scale)
    assert policy.latent_shape() == (16, 64) and policy.vae.dtype == torch.float32
    cond, index = PromptEncodings(policy).for_prompts(PROMPTS, torch.device("cpu"))  # the trainer's path
    cond = select(cond, index)
    lengths = cond["encoder_hidden_states_mask"].sum(1).tolist()
    assert lengths == [7, 22] == [cond["encoder_hidden_states"].shape[1] - 15, 22]  # the short one padded
    x1 = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    steps = sampling_steps("cps", 0.0, policy.sigmas(n))
    ours = sample(policy, policy.transformer, cond, x1.clone(), steps).final
    images = policy.decode(ours)

    pipe = stock(tiny)
    final = {}

    def keep(pipe, i, t, kw):
        final["latents"] = kw["latents"]
        return kw

    ref = pipe(
        PROMPTS,
        negative_prompt=[" "] * 2 if cfg_scale else None,
        true_cfg_scale=cfg_scale or 1.0,
        height=64,
        width=64,
        num_inference_steps=n,
        latents=x1.clone(),
        max_sequence_length=SEQ,
        output_type="pt",
        callback_on_step_end=keep,
    ).images
    torch.testing.assert_close(ours, final["latents"], atol=1e-5, rtol=0)
    assert images.shape == (2, 3, 64, 64)
    assert_same_levels(images, ref)
    torch.testing.assert_close(policy.sigmas(n)[:-1], pipe.scheduler.sigmas[:-1].float())


def test_velocity_is_the_same_with_and_without_the_mask_key(tiny):
    """The prompt cache sends no mask when a batch needs no padding (encode_prompt's None): the velocity of
    an all-ones mask and of no mask agree, with true CFG's negative (6 tokens) padded to the prompt's 22."""
    policy = qwen_policy(tiny, cfg_scale=4.0)
    cond = policy.encode(PROMPTS[1:])
    assert bool(cond["encoder_hidden_states_mask"].all())
    bare = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    x = torch.randn(3, *policy.latent_shape(), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v_mask = policy.velocity(policy.transformer, x, torch.tensor([0.9, 0.5, 0.2]), cond)
        v_bare = policy.velocity(policy.transformer, x, torch.tensor([0.9, 0.5, 0.2]), bare)
    torch.testing.assert_close(v_mask, v_bare, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        policy.velocity(policy.transformer, x, 0.5, {**cond, "encoder_hidden_states_mask": torch.ones(2, 22)})


def test_encode_drops_the_template_as_encode_prompt_does(tiny):
    """encode = encode_prompt's states (Qwen2.5-VL's last layer past the template's 34 tokens) with a mask
    that is always there; text_token_counts counts what encode keeps, and the cut at max_sequence_length
    is encode_prompt's."""
    policy = qwen_policy(tiny)
    pipe = stock(tiny)
    cond = policy.encode(PROMPTS)
    states, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=SEQ)
    torch.testing.assert_close(cond["encoder_hidden_states"], states)
    assert torch.equal(cond["encoder_hidden_states_mask"], mask) and mask.dtype == torch.long
    counts = policy.text_token_counts(PROMPTS)
    assert counts == mask.sum(1).tolist() == [7, 22]
    # the first kept token is the prompt's own: what the template puts before it is gone
    template = pipe.prompt_template_encode.format(PROMPTS[0])
    ids = pipe.tokenizer(template)["input_ids"]
    assert pipe.tokenizer.convert_ids_to_tokens(ids[34:36]) == ["a", "Ġcat"]
    # one prompt alone: encode_prompt gives no mask; encode keeps an all-ones one
    assert pipe.encode_prompt(PROMPTS[:1], device="cpu")[1] is None
    assert policy.encode(PROMPTS[:1])["encoder_hidden_states_mask"].tolist() == [[1] * 7]
    long = "x " * 40  # 80 tokens: cut at SEQ like encode_prompt's [:, :max_sequence_length]
    assert policy.text_token_counts([long]) == [85]
    assert policy.encode([long])["encoder_hidden_states"].shape[1] == SEQ


def test_transformer_gets_the_pipelines_timestep_in_bf16(tiny):
    """QwenImagePipeline casts ``t = 1000·σ`` to the latents' dtype and passes ``t / 1000`` (FLUX's casts):
    our one forward of [prompt; negative] carries the values of its two forwards, bit for bit in bf16."""
    n = 28
    ours = qwen_policy(tiny, "bf16", cfg_scale=4.0)
    cond = ours.encode(PROMPTS[:1])
    sig = ours.sigmas(n)
    seen = []
    hook = ours.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].detach().clone()), with_kwargs=True
    )
    x = torch.randn(1, *ours.latent_shape())
    with torch.no_grad():
        for i in range(n):
            ours.velocity(ours.transformer, x, sig[i].expand(1), cond)
    hook.remove()

    pipe = stock(tiny, torch.bfloat16)
    theirs = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: theirs.append(kw["timestep"].detach().clone()), with_kwargs=True
    )
    pipe(
        PROMPTS[0],
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=64,
        width=64,
        num_inference_steps=n,
        max_sequence_length=SEQ,
        output_type="latent",
    )
    hook.remove()
    assert len(seen) == n and len(theirs) == 2 * n  # the pipeline: prompt, then negative
    for i, t in enumerate(seen):
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, torch.cat([theirs[2 * i], theirs[2 * i + 1]]))
    cast = sig[:n].to(torch.bfloat16)
    assert int((cast != torch.stack([s[0] for s in theirs[::2]])).sum()) > 0  # what σ.to(bf16) would pass


def test_lora_export_loads_in_stock_qwenimage_pipeline(tiny, tmp_path):
    """The trained adapters, exported as the trainer exports them, load with QwenImagePipeline's
    ``load_lora_weights`` and give the trained policy's velocity (true CFG on); adapters off = the base."""
    from fastcps.config import LoraConfig

    policy = qwen_policy(tiny, cfg_scale=4.0, lora=LoraConfig(r=4, alpha=8.0))
    cond = policy.encode(PROMPTS)
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.7, 0.3])
    named = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert len(named) == 2 * 2 * 12  # 2 blocks x 12 FlowCPS targets x (A, B)
    assert_exported_lora_loads_in_stock(policy, x, s, cond, stock(tiny), tmp_path)


# --- the recipe's pieces --------------------------------------------------------------------------------

# FlowCPS's list, transcribed (IamCreateAI/FlowCPS scripts/train_qwenimage.py, target_modules)
FLOWCPS_QWENIMAGE = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]


def real_transformer(device="meta"):
    from diffusers import QwenImageTransformer2DModel

    mc = json.loads((ROOT / "configs" / "models" / "qwen-image_transformer.json").read_text())
    with torch.device(device):
        return QwenImageTransformer2DModel.from_config({k: v for k, v in mc.items() if not k.startswith("_")})


def test_default_lora_targets_are_flowcps_modules_on_the_real_architecture():
    """Qwen-Image: 60 dual-stream blocks, each with the joint attention's 8 projections and both streams'
    feed-forwards (2 linears each): 60 x 12 = 720 adapted modules, and nothing else."""
    from fastcps.policies.qwenimage import QwenImagePolicy

    assert list(QwenImagePolicy.default_lora_targets) == FLOWCPS_QWENIMAGE
    model = real_transformer()
    assert sum(p.numel() for p in model.parameters()) == 20_430_401_088  # Qwen-Image's 20 B
    p = QwenImagePolicy.__new__(QwenImagePolicy)  # the LoRA part only: no weights to load
    p.transformer = model
    p.add_lora(4, 8.0)
    got = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    want = {f"transformer_blocks.{i}.{t}" for i in range(60) for t in FLOWCPS_QWENIMAGE}
    assert got == want and len(got) == 720


def test_scheduler_and_vae_configs_are_qwen_images(tiny):
    """The tiny pipeline's scheduler is configs/models/qwen-image_scheduler.json; its VAE normalises with
    configs/models/qwen-image_vae.json's latents mean and std."""
    sched = json.loads((ROOT / "configs" / "models" / "qwen-image_scheduler.json").read_text())
    assert {k: v for k, v in sched.items() if not k.startswith("_")} == QWENIMAGE_SCHEDULER
    vae = json.loads((ROOT / "configs" / "models" / "qwen-image_vae.json").read_text())
    saved = json.loads((tiny / "vae" / "config.json").read_text())
    assert saved["latents_mean"] == vae["latents_mean"] and saved["latents_std"] == vae["latents_std"]


# --- the full-size architecture on fake CUDA -------------------------------------------------------------


class HostReward:
    """One fp32 score per image, on the CPU (as tests/test_virtual_cuda.py's)."""

    parts = [("host", 1.0, None)]

    def __call__(self, images, prompts, metadata):
        assert images.device.type == "cuda" and images.shape[:2] == (len(prompts), 3), images
        r = torch.rand(len(prompts))
        return RewardOutput(r, {"host": r})


@pytest.mark.slow
def test_qwenimage_recipe_at_full_size_on_fake_cuda(tiny):
    """configs/qwenimage_pickscore.json at Qwen-Image's real size: the 20.4 B-parameter transformer built
    from configs/models/qwen-image_transformer.json (no weights: meta, then fake CUDA), LoRA r 64 on
    FlowCPS's 720 modules, bf16, gradient checkpointing, 512 px (1024 image tokens), 10 steps with a 2-step
    SDE window, true CFG 4 (one forward of 2B, the negative's 6 tokens padded to the prompts'), Qwen2.5-VL-7B
    -sized states. Rollout, advantages and a training micro-step all stay on the device, with no host sync
    in the micro-step."""
    from fake_cuda import fake_policy, rollout_and_micro_step
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastcps.config import RunConfig, load_config
    from fastcps.conditioning import PromptEncodings
    from fastcps.prompts import load_prompts
    from fastcps.rollout import epoch_slots, epoch_steps

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
    cfg = load_config(RunConfig, str(ROOT / "configs" / "qwenimage_pickscore.json"), sets)
    policy = build_policy(cfg.policy, "cpu")  # tiny encoder and VAE; the transformer is replaced below
    policy.transformer = real_transformer().to(torch.bfloat16)
    policy.transformer.enable_gradient_checkpointing()
    policy.add_lora(cfg.policy.lora.r, cfg.policy.lora.alpha)
    assert sum(p.numel() for p in policy.transformer.parameters()) > 20.4e9
    assert policy.cfg_scale == 4.0 and policy.latent_shape() == (1024, 64)
    sampling = epoch_steps(cfg, 0, policy)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_policy(policy, mode, cuda)
    width = 3584  # Qwen2.5-VL-7B's hidden size

    def states(n, length):
        return {
            "encoder_hidden_states": torch.zeros(n, length, width, dtype=torch.bfloat16, device=cuda),
            "encoder_hidden_states_mask": torch.ones(n, length, dtype=torch.long, device=cuda),
        }

    # the epoch's two prompts at 40 and 25 tokens: fake tensors hold no mask values, so each is cached alone
    # at its own length first; the rollout's batch then pads the shorter one and carries the mask
    pool = load_prompts(cfg.prompts.source)
    chosen = [pool[0][i] for i in epoch_slots(cfg, 0, len(pool[0]), 0, 1)[0]]
    length_of = dict(zip(chosen, (40, 25)))
    policy.encode = lambda prompts, metadata=None: states(len(prompts), length_of[prompts[0]])
    encodings = PromptEncodings(policy)
    with mode:
        policy._negative = states(1, 6)  # " " after the template
        for p in chosen:
            encodings.for_prompts([p], cuda)
        cond, _ = encodings.for_prompts(chosen, cuda)
        assert cond["encoder_hidden_states_mask"].shape == (2, 40)
        data, out, logp = rollout_and_micro_step(
            cfg, sampling, policy, HostReward(), encodings, pool, cuda, 4
        )
    assert data.x_t.shape == (4, 2, 1024, 64) and data.preview.shape[1:] == (3, 512, 512)
    for t in (data.x_t, data.log_prob, out.loss, logp):
        assert t.device.type == "cuda"
    assert out.loss.requires_grad


# --- the trainer: one GRPO epoch, ZeRO-3, 2 processes -----------------------------------------------------


@pytest.mark.slow
def test_one_grpo_epoch_of_the_recipe_zero3_two_processes(tiny, tmp_path):
    """configs/qwenimage_pickscore.json on the tiny pipeline: two ranks run an epoch through the trainer
    (prompt cache with padded batches, true CFG in rollout and update, ZeRO-3), the ratio starts at 1, and
    the saved adapter loads in stock QwenImagePipeline."""
    from multi_run import launch
    from safetensors.torch import load_file
    from tiny_rewards import _tiny_hf_clip

    clip = tmp_path / "tiny_pickscore"
    _tiny_hf_clip(clip)
    reward = {"model": str(clip / "model"), "processor": str(clip / "processor"), "max_length": 16}
    sets = [
        f"policy.pretrained={tiny}",
        f"prompts.source={ROOT / 'configs' / 'prompts' / 'pickscore.txt'}",
        "policy.dtype=fp32",
        "policy.resolution=64",
        f"policy.max_sequence_length={SEQ}",
        'policy.lora={"r": 4, "alpha": 8.0}',
        "policy.offload_frozen=false",
        f"rewards={json.dumps([{'name': 'pickscore', 'args': reward}])}",
        "sampler.num_steps=4",
        "sampler.sde_window_range=[0, 2]",
        "train.num_epochs=1",
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=4",
        "train.rollout_batch_size=4",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.micro_batch=null",
        "eval.every=0",
        "log.progress=false",
        "checkpoint.every=0",
        f"output_dir={tmp_path}",
        "name=qwen",
    ]
    config = ["--config", str(ROOT / "configs" / "qwenimage_pickscore.json")]
    launch([config + [a for kv in sets for a in ("--set", kv)]], world=2, timeout=400)
    run = tmp_path / "qwen"
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["train/ratio_dev"] == 0.0 and last["train/loss"] == last["train/loss"]  # finite, not NaN
    assert "reward/pickscore/mean" in last
    final = run / "checkpoints" / "final"
    trained = load_file(str(final / "policy.safetensors"))
    assert trained and all("lora_" in k for k in trained)
    assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k)  # it moved
    pipe = stock(tiny)
    pipe.load_lora_weights(final)
    assert sum("lora_" in k for k in pipe.transformer.state_dict()) == len(trained)
