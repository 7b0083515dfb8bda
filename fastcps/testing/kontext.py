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

from pathlib import Path

from fastcps.testing import save_tiny_flux


def save_tiny_kontext(folder: str | Path, *, seed: int = 0) -> Path:
    """A FluxKontextPipeline shaped like FLUX.1-Kontext-dev: the tiny FLUX.1-dev pipeline's components (one
    double and one single block, 2 heads of 16, guidance embedding, FLUX.1-dev's dynamic shift, which
    Kontext [dev] keeps). ~0.5 MB of weights."""
    return save_tiny_flux(folder, seed=seed, pipeline="FluxKontextPipeline")


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
