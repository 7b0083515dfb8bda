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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images [..., H, W] in [0, 1] -> uint8 levels on their device, as the anchors quantise every image
    they score: ``(images * 255).round().clamp(0, 255).to(torch.uint8)`` (flow_grpo flow_grpo/rewards.py,
    each reward; the level a saved 8-bit image holds). Exact on the k/255 values the FLUX/SD3 policies
    decode to (``DiffusersPolicy._vae_decode``): it gives k back."""
    # one temporary, rounded and clamped in place: the same values, ~6x faster on the CPU for 8 images of
    # 512x512 (each fresh multi-MB temporary is page-faulted in anew)
    return (images.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def to_uint8_hwc(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> numpy uint8 [H, W, 3] (RGB), ``to_uint8``'s levels."""
    return to_uint8(image).permute(1, 2, 0).cpu().numpy()


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(to_uint8_hwc(image))


def uint8_hwc_batch(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> B numpy uint8 [H, W, 3] arrays (one copy of the quantised batch to the
    host, 1 byte a pixel value)."""
    return list(to_uint8(images).permute(0, 2, 3, 1).cpu().numpy())


def pil_backend(image_processor):
    """The transformers image processor that resizes with PIL, as the anchors' did: flow_grpo pins
    transformers 4.40.0 (its setup.py), whose ``CLIPImageProcessor`` converts a uint8 image to PIL, resizes
    it with PIL's bicubic filter, crops, rescales in float64 and normalises in float32; transformers 5's
    default ``CLIPImageProcessor`` resizes with torchvision instead (another filter), and its PIL backend
    (``CLIPImageProcessorPil``) is the 4.40 one. ``image_processor`` is returned as it is when it is a PIL
    backend already."""
    if getattr(image_processor, "backend", "pil") == "pil":
        return image_processor
    import transformers

    name = type(image_processor).__name__ + "Pil"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise TypeError(
            f"{type(image_processor).__name__} has no PIL backend ({name}) in transformers "
            f"{transformers.__version__}: the rewards preprocess as the anchors did, with PIL"
        )
    return cls.from_dict(image_processor.to_dict())


def hf_pixel_values(image_processor, images: torch.Tensor) -> torch.Tensor:
    """Pixel values [B, 3, S, S] (fp32, CPU) of images [B, 3, H, W] in [0, 1], as flow_grpo's scorers get
    them: ``to_uint8``'s levels handed to the processor, PIL-resized (``pil_backend``)."""
    proc = pil_backend(image_processor)
    return proc(images=uint8_hwc_batch(images), return_tensors="pt")["pixel_values"]


def open_clip_pixel_values(images: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    """Pixel values [B, 3, S, S] (fp32, CPU) of images [B, 3, H, W] in [0, 1], as HPSv2's scorer gets them:
    PIL images of ``to_uint8``'s levels through open_clip's eval transform (resize of the short side with
    PIL's bicubic filter, center crop, ``ToTensor``, normalise), tgxs002/HPSv2 ``hpsv2/img_score.py``
    ``preprocess_val(image)`` and flow_grpo ``flow_grpo/hpsv2_scorer.py`` alike."""
    import open_clip
    from PIL import Image

    pre = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
    return torch.stack([pre(Image.fromarray(a)) for a in uint8_hwc_batch(images)])
