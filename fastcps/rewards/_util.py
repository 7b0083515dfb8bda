"""Helpers shared by the model-based rewards (weights resolution, device/dtype, batching, image prep)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fastcps.runtime import DTYPES

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_kwargs() -> dict:
    """``from_pretrained`` kwargs: ``local_files_only=True`` when ``HF_HUB_OFFLINE=1``."""
    return {"local_files_only": True} if hub_offline() else {}


def is_local_path(value: str) -> bool:
    """A value is a local path when it exists, is absolute / starts with ``.`` or ``~``, has a file
    suffix, or is not shaped like a hub id ``org/name``; otherwise it is taken for a hub id."""
    s = str(value)
    if Path(s).expanduser().exists() or s.startswith(("/", ".", "~")):
        return True
    if Path(s).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json"):
        return True
    return not _HUB_ID.match(s)


def weights_not_found(reward: str, key: str, value) -> FileNotFoundError:
    return FileNotFoundError(
        f"reward {reward!r}: weights not found at {str(value)!r} (config key rewards[].args.{key})"
    )


def resolve_weights(reward: str, key: str, value) -> tuple[str, bool]:
    """``(value, is_local)``; a local path that does not exist raises FileNotFoundError naming the
    reward and the config key."""
    if value is None or str(value) == "":
        raise FileNotFoundError(
            f"reward {reward!r}: no weights given (set config key rewards[].args.{key} to a path or hub id)"
        )
    s = str(value)
    if is_local_path(s):
        p = Path(s).expanduser()
        if not p.exists():
            raise weights_not_found(reward, key, s)
        return str(p), True
    return s, False


def hub_load_error(reward: str, key: str, value, err: Exception) -> OSError:
    mode = " (HF_HUB_OFFLINE=1: only the local hub cache is used)" if hub_offline() else ""
    return OSError(
        f"reward {reward!r}: could not load {str(value)!r} given by config key rewards[].args.{key} "
        f"as a local path or hub id{mode}: {err}"
    )


def from_pretrained(reward: str, key: str, cls, value):
    """``cls.from_pretrained(value)`` (offline when HF_HUB_OFFLINE=1); a failure names the reward and
    the config key that gave ``value``."""
    try:
        return cls.from_pretrained(value, **hub_kwargs())
    except OSError as err:
        raise hub_load_error(reward, key, value, err) from err


def resolve_device(device, images: torch.Tensor) -> torch.device:
    return torch.device(device) if device is not None else images.device


_DTYPES = {
    None: torch.float32,
    **DTYPES,  # the config's short names
    **{str(dt).removeprefix("torch."): dt for dt in DTYPES.values()},  # float32, float16, bfloat16
    "amp": torch.float32,  # fp32 weights, the forward under fp16 autocast on CUDA (``autocast``)
}


def resolve_dtype(reward: str, dtype, device: torch.device) -> torch.dtype:
    """The reward model's weight dtype for the config value ``dtype``: float32 | float16 | bfloat16, or
    ``amp`` (fp32 weights, fp16 autocast in the forward on CUDA: torch.cuda.amp, as HPSv2's authors score)."""
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise ValueError(
            f"reward {reward!r}: config key rewards[].args.dtype must be one of "
            f"float32/float16/bfloat16/amp, got {dtype!r}"
        )
    if device.type == "cpu" and dt == torch.float16:
        return torch.float32  # half matmuls on CPU are slow or missing; fp16 is a CUDA option
    return dt


def autocast(dtype, device: torch.device):
    """The context of a reward forward: fp16 autocast for ``dtype="amp"`` on CUDA, else nothing (on the
    CPU ``amp`` is plain fp32, as float16 is)."""
    import contextlib

    if dtype == "amp" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def check_inputs(reward: str, images: torch.Tensor, prompts, metadata=None) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {reward!r} expects images [B, 3, H, W] in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward {reward!r} got {images.shape[0]} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise ValueError(f"reward {reward!r} got {images.shape[0]} images but {len(metadata)} metadata")


def batches(n: int, batch_size: int):
    bs = max(1, int(batch_size))
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def to_uint8_hwc(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> numpy uint8 [H, W, 3] (RGB)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(to_uint8_hwc(image))


def clip_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """CLIP-style eval transform on tensors: bicubic resize of the short side to ``size`` (antialiased),
    center crop ``size``×``size``, normalize. ``images`` [B, 3, H, W] in [0, 1]."""
    import torch.nn.functional as F

    x = images.float().clamp(0, 1)
    h, w = x.shape[-2:]
    if min(h, w) != size:
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
