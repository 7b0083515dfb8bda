"""A tiny random-weight FLUX.1 Kontext pipeline (``FluxKontextPipeline``) saved like a hub snapshot
(``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``), for the tests: the
``kontext`` policy loads it with ``from_pretrained(path, subfolder=...)`` as it loads
black-forest-labs/FLUX.1-Kontext-dev. Nothing downloads: the tokenizers and encoders are the tiny FLUX
pipeline's (``fastcps.testing``).

What the policy depends on keeps the real model's structure: FLUX.1-dev's transformer layout with a guidance
embedding and a RoPE over three axes (the first one tells the source image's tokens, id 1, from the target's,
id 0), the 16-channel 8x VAE with FLUX's scaling and shift factors (an encode without ``(z - shift) · scale``
is visibly off), and FLUX.1-dev's scheduler config (the dynamic shift from the token count).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fastcps.testing import CLIP_DIM, T5_DIM, _clip, _clip_tokenizer, _t5, _t5_tokenizer, _vae

#: FLUX.1-dev's scheduler_config.json (configs/models/flux1-dev_scheduler.json): Kontext [dev] keeps it
KONTEXT_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    base_shift=0.5,
    max_shift=1.15,
)


def save_tiny_kontext(folder: str | Path, *, seed: int = 0) -> Path:
    """A FluxKontextPipeline shaped like FLUX.1-Kontext-dev (one double and one single block, 2 heads of
    16, guidance embedding, dynamic shift). ~0.5 MB of weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok, v1 = _clip_tokenizer(Path(tmp))
    tok2, v2 = _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER),
        vae=_vae(0.3611, 0.1159),  # FLUX.1's AutoencoderKL scaling_factor, shift_factor
        text_encoder=_clip(v1, False),
        tokenizer=tok,
        text_encoder_2=_t5(v2),
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def save_source_images(folder: str | Path, count: int = 2, size: int = 80, seed: int = 0) -> list[Path]:
    """``count`` distinct RGB JPEGs of ``size`` px (smooth colour gradients plus noise, so a resize and the
    VAE see structure), saved under ``folder``: the source images of edit rows in the tests."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    paths = []
    for i in range(count):
        base = np.stack([np.outer(ramp, ramp), ramp[None].repeat(size, 0), ramp[:, None].repeat(size, 1)], -1)
        pixels = np.roll(base, i + 1, axis=-1) * 200 + rng.uniform(0, 55, (size, size, 3))
        path = folder / f"source_{i}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
        paths.append(path)
    return paths
