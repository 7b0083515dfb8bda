"""``jpeg_compressibility``: DDPO's compressibility reward, r = −(JPEG size in kB).

Each image is quantised to uint8 RGB (``(images * 255).round().clamp(0, 255)``) and saved with PIL at
quality 95; the reward is minus the file size in kilobytes (1 kB = 1000 bytes), as DDPO does
(``-len(buffer) / 1000``). flow_grpo's ``jpeg_compressibility`` computes the same size from the same
bytes and divides it by 500: its reward is this one / 500 (``weight: 0.002`` in ``rewards`` gives it).
Scale: a 512×512 photo is typically 30–150 kB (reward −150 … −30; uniform noise is ~310 kB); a 16×16
toy image lies between 0.63 kB (blank: mostly the JPEG header) and ~0.93 kB (uniform noise), so on the
toy it moves by tenths. Runs on CPU, under no grad.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from fastcps.rewards import RewardArgs
from fastcps.rewards._util import uint8_hwc_batch

__all__ = ["JpegCompressibility"]


class JpegCompressibility:
    name = "jpeg_compressibility"

    class Args(RewardArgs):
        quality: int = 95
        """JPEG quality the images are encoded at."""

    def __init__(self, quality: int = 95):
        self.quality = int(quality)

    @classmethod
    def files(cls, args: dict) -> list:
        """Nothing: PIL's encoder."""
        return []

    def __call__(
        self, images: torch.Tensor, prompts: list[str] | None = None, metadata: list[dict] | None = None
    ) -> torch.Tensor:
        from PIL import Image

        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"jpeg_compressibility expects images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}"
            )
        sizes = []
        for a in uint8_hwc_batch(images):
            img = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)
