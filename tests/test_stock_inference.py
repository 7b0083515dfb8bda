"""What stock inference computes (issue 26, point 2), for the `flux` and `sd3` policies: the timestep the
transformer receives is the stock pipeline's, bit for bit and in bf16 too; the default LoRA targets are
flow_grpo's, listed module by module on the real SD3.5-Medium and FLUX.1-dev architectures (built on the
meta device from configs/models/); the VAE decodes in fp32 and the images are quantised to the 8-bit
levels flow_grpo's rewards score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcps.config import PolicyConfig
from fastcps.policies import build_policy
from fastcps.testing import save_tiny_flux, save_tiny_sd3

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"flux": save_tiny_flux(root / "flux"), "sd3": save_tiny_sd3(root / "sd3")}


def policy(name, path, dtype="bf16", **kw):
    cfg = PolicyConfig(
        name=name, pretrained=str(path), dtype=dtype, resolution=64, max_sequence_length=SEQ, **kw
    )
    return build_policy(cfg, "cpu")


def record_timesteps(transformer) -> tuple[list, object]:
    """The ``timestep`` every forward of ``transformer`` is given (dtype and values, as passed)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["timestep"].detach().clone())

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


# --- the timestep --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sd3_transformer_gets_the_pipelines_fp32_timestep(tiny, dtype):
    """StableDiffusion3Pipeline passes the scheduler's fp32 ``t = 1000·σ`` as it is; at 10 steps (the SD3.5
    recipes') a bf16 cast changes 8 of them (818.18 -> 820, 923.08 -> 924)."""
    from diffusers import StableDiffusion3Pipeline

    n = 10
    ours = policy("sd3", tiny["sd3"], dtype)
    cond = ours.encode(["a red bus"])
    sig = ours.sigmas(n)
    seen, hook = record_timesteps(ours.transformer)
    x = torch.randn(1, *ours.latent_shape())
    with torch.no_grad():
        for i in range(n):
            ours.velocity(ours.transformer, x, sig[i].expand(1), cond)
    hook.remove()

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"], dtype=ours.dtype)
    stock, hook = record_timesteps(pipe.transformer)
    with torch.no_grad():
        pipe(
            "a red bus",
            height=64,
            width=64,
            num_inference_steps=n,
            guidance_scale=1.0,
            sigmas=list(np.linspace(1.0, 1 / n, n)),
            max_sequence_length=SEQ,
            output_type="latent",
        )
    hook.remove()
    assert len(seen) == len(stock) == n
    for a, b in zip(seen, stock):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
    t = torch.stack([s[0] for s in stock])
    assert int((t.to(torch.bfloat16).float() != t).sum()) == 8  # what the old bf16 cast would have changed


def test_flux_transformer_gets_the_pipelines_timestep_in_bf16(tiny):
    """FluxPipeline casts ``t = 1000·σ`` to the latents' dtype (bf16 here) and passes ``t / 1000``: not
    ``σ`` cast to bf16, which differs at 7 of 28 steps at these 16 tokens (at FLUX.1-dev's 512 px, 1024
    tokens: at 4 of the recipe's 28 eval steps, none of its 6 rollout steps)."""
    from diffusers import FluxPipeline

    n = 28
    ours = policy("flux", tiny["flux"], guidance=3.5)
    cond = ours.encode(["a cat"])
    sig = ours.sigmas(n)
    seen, hook = record_timesteps(ours.transformer)
    x = torch.randn(1, *ours.latent_shape())
    with torch.no_grad():
        for i in range(n):
            ours.velocity(ours.transformer, x, sig[i].expand(1), cond)
    hook.remove()

    pipe = FluxPipeline.from_pretrained(tiny["flux"], dtype=torch.bfloat16)
    stock, hook = record_timesteps(pipe.transformer)
    with torch.no_grad():
        pipe(
            "a cat",
            height=64,
            width=64,
            num_inference_steps=n,
            guidance_scale=3.5,
            max_sequence_length=SEQ,
            output_type="latent",
        )
    hook.remove()
    assert len(seen) == len(stock) == n
    for a, b in zip(seen, stock):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
    cast = sig[:n].to(torch.bfloat16)
    assert int((cast != torch.stack([s[0] for s in stock])).sum()) == 7  # what σ.to(bf16) would have passed


# --- the LoRA targets ----------------------------------------------------------------------------------

# flow_grpo's lists, transcribed (yifan123/flow_grpo scripts/train_sd3.py and scripts/train_flux.py)
FLOW_GRPO_SD3 = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
FLOW_GRPO_FLUX = [
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
]


def adapted_modules(policy_cls, config: str) -> set[str]:
    """``Policy.add_lora`` with the defaults on the real architecture (meta device): the adapted modules."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cfg = json.loads((ROOT / "configs" / "models" / config).read_text())
    cls = FluxTransformer2DModel if "flux" in config else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    p = policy_cls.__new__(policy_cls)  # the LoRA part only: no weights to load
    p.transformer = model
    p.add_lora(4, 8.0)
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A")}


def test_sd35_medium_lora_adapts_flow_grpos_modules_and_not_attn2():
    """SD3.5-Medium: 24 joint blocks, 0-12 with a second self-attention ``attn2``, block 23
    ``context_pre_only`` (no ``attn.to_add_out``): 24 x 8 - 1 = 191 projections, none of ``attn2``."""
    from fastcps.policies.sd3 import SD3Policy

    assert sorted(SD3Policy.default_lora_targets) == sorted(FLOW_GRPO_SD3)
    got = adapted_modules(SD3Policy, "sd3.5-medium_transformer.json")
    want = {f"transformer_blocks.{i}.{t}" for i in range(24) for t in FLOW_GRPO_SD3}
    want.discard("transformer_blocks.23.attn.to_add_out")
    assert got == want and len(got) == 191
    assert not any(".attn2." in n for n in got)


def test_flux_dev_lora_adapts_flow_grpos_modules():
    """FLUX.1-dev: 19 double blocks (attention and both feed-forwards: 12 each), 38 single blocks
    (``attn.to_q/k/v``; their output is ``proj_out``, their MLP ``proj_mlp``): 342 modules."""
    from fastcps.policies.flux import FluxPolicy

    assert list(FluxPolicy.default_lora_targets) == FLOW_GRPO_FLUX
    got = adapted_modules(FluxPolicy, "flux1-dev_transformer.json")
    want = {f"transformer_blocks.{i}.{t}" for i in range(19) for t in FLOW_GRPO_FLUX}
    want |= {f"single_transformer_blocks.{i}.attn.{p}" for i in range(38) for p in ("to_q", "to_k", "to_v")}
    assert got == want and len(got) == 342


# --- the decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_decode_is_flow_grpos_fp32_decode_quantised_to_8_bit_levels(tiny, name):
    """flow_grpo: ``pipeline.vae.to(device, dtype=torch.float32)``, the pipeline's decode and
    ``postprocess(output_type="pt")``, then every reward's ``(images * 255).round().clamp(0, 255)``. A bf16
    policy keeps its VAE in fp32 and gives those levels, / 255."""
    from diffusers import DiffusionPipeline

    ours = policy(name, tiny[name], "bf16", **({"guidance": 3.5} if name == "flux" else {}))
    assert ours.vae.dtype == torch.float32 and ours.transformer.dtype == torch.bfloat16
    x = torch.randn(2, *ours.latent_shape(), generator=torch.Generator().manual_seed(4))
    images = ours.decode(x)

    pipe = DiffusionPipeline.from_pretrained(tiny[name])  # fp32: flow_grpo's VAE
    pipe.vae.requires_grad_(False)  # as flow_grpo: on the CPU a conv's result depends on it (3e-6 here)
    z = x
    if name == "flux":
        z = pipe._unpack_latents(x, 64, 64, pipe.vae_scale_factor)
    with torch.no_grad():
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        anchor = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
    anchor = (anchor * 255).round().clamp(0, 255).to(torch.uint8)
    assert images.dtype == torch.float32
    assert torch.equal((images * 255).round().to(torch.uint8), anchor)
    assert torch.equal(images, anchor.float() / 255)  # exactly the levels, nothing between
