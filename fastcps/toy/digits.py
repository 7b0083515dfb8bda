"""The toy's data: scikit-learn's bundled handwritten digits, prompts about them, FLUX-style packing.

``load_digits`` ships 1,797 8×8 grayscale images (values 0..16) inside scikit-learn, so the toy needs
no download. We upsample them to 16×16 (bilinear), scale to [-1, 1] (background −1) and pack 2×2
patches into 64 tokens of 4 channels, the way FluxPipeline packs VAE latents.

The train / held-out split is a fixed permutation (seed ``SPLIT_SEED``): the held-out images are
used only to measure the classifier that the ``digit`` reward is built on.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGIT_WORDS",
    "IMAGE_SIZE",
    "NUM_HELDOUT",
    "NUM_TOKENS",
    "PATCH",
    "SPLIT_SEED",
    "TEMPLATES",
    "TOKEN_CHANNELS",
    "all_prompts",
    "digit_of",
    "image_ids",
    "load_split",
    "pack",
    "parse_digit",
    "prompt_for",
    "unpack",
]

IMAGE_SIZE = 16
PATCH = 2
NUM_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 64
TOKEN_CHANNELS = PATCH * PATCH  # 4 (one gray channel × 2×2)
SPLIT_SEED = 1234
NUM_HELDOUT = 360  # ~20% of 1,797

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word} is the spelled-out digit, {d} the numeral. Template 0 is the canonical one.
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {d}",
    "a sketch of the digit {d}",
    "a drawing of the number {word}",
)

_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}
_TOKEN_RE = re.compile(r"[a-z]+|[0-9]")


def load_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 16, 16] fp32 in [-1, 1], labels [N] int64)`` for ``split`` in
    {"train", "heldout", "all"}. Deterministic: same tensors on every call and machine."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()
    y = torch.from_numpy(data.target.astype(np.int64))
    if split == "all":
        return x, y
    perm = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(len(y)))
    idx = perm[NUM_HELDOUT:] if split == "train" else perm[:NUM_HELDOUT]
    idx = idx.sort().values  # fixed, ordered; the trainers shuffle with their own seed
    return x[idx].contiguous(), y[idx].contiguous()


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt of ``digit`` written with template number ``template`` (0 = canonical)."""
    digit = int(digit)
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return TEMPLATES[template % len(TEMPLATES)].format(word=DIGIT_WORDS[digit], d=digit)


def all_prompts() -> list[str]:
    """Every (digit, template) prompt: 10 × len(TEMPLATES)."""
    return [prompt_for(d, t) for d in range(10) for t in range(len(TEMPLATES))]


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for ("a handwritten digit seven", "the number 7" -> 7).

    Raises ValueError naming the prompt if it names no digit or more than one distinct digit.
    """
    found = set()
    for tok in _TOKEN_RE.findall(prompt.lower()):
        if tok.isdigit():
            found.add(int(tok))
        elif tok in _WORD_TO_DIGIT:
            found.add(_WORD_TO_DIGIT[tok])
    if len(found) != 1:
        raise ValueError(
            f"cannot tell which digit the prompt {prompt!r} asks for (found {sorted(found) or 'none'}); "
            "write it as a numeral or a word (e.g. 'the number 7'), or pass metadata={'digit': 7}"
        )
    return found.pop()


def digit_of(prompt: str, metadata: dict | None = None) -> int:
    """The target digit: ``metadata['digit']`` (or ``'label'``) when given, else parsed from the prompt."""
    if metadata:
        for key in ("digit", "label"):
            if key in metadata and metadata[key] is not None:
                return int(metadata[key])
    return parse_digit(prompt)


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] tokens, exactly FluxPipeline._pack_latents."""
    if images.ndim != 4 or images.shape[-1] % PATCH or images.shape[-2] % PATCH:
        raise ValueError(f"pack expects [B, C, H, W] with even H, W; got {tuple(images.shape)}")
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack`: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, n, d = tokens.shape
    hp, wp = height // PATCH, width // PATCH
    if n != hp * wp or d % (PATCH * PATCH):
        raise ValueError(f"unpack: tokens {tuple(tokens.shape)} do not fit a {height}×{width} image")
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, hp, wp, c, PATCH, PATCH)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(
    height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, device=None, dtype=torch.float32
) -> torch.Tensor:
    """FLUX ``img_ids`` [(H/2)(W/2), 3]: (0, row, col) per token, as
    FluxPipeline._prepare_latent_image_ids."""
    hp, wp = height // PATCH, width // PATCH
    ids = torch.zeros(hp, wp, 3)
    ids[..., 1] += torch.arange(hp)[:, None]
    ids[..., 2] += torch.arange(wp)[None, :]
    return ids.reshape(hp * wp, 3).to(device=device, dtype=dtype)
