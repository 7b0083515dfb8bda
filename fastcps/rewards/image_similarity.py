"""``image_similarity``: CLIP image-image cosine between each image and a reference image named in its
prompt's metadata, the editing recipes' reward (FlowCPS ``config/grpo.py``: counting_edit with FLUX.1 Kontext,
``"image_similarity": 0.5``; Qwen-Image-Edit, 0.2).

Computed as FlowCPS computes it (IamCreateAI/FlowCPS ``flow_grpo/rewards.py`` ``image_similarity_score`` ->
``flow_grpo/clip_scorer.py`` ``ClipScorer.image_similarity``; its training script
``scripts/train_flux_kontext.py``):

- model: transformers ``CLIPModel`` ``openai/clip-vit-large-patch14``, in float32, and the mean, std and sizes
  of that repo's ``CLIPProcessor``;
- the generated images are scored as the float tensors they are (not quantised: the anchor hands its
  pipeline's float output straight to the scorer; the FLUX/SD3 policies' k/255 levels give the same);
- the reference: an edit row's source image (``metadata["source_images"][0]``, the absolute path the prompt
  loader resolved) by default, else ``metadata[key]`` (default ``"image"``, the key FlowCPS's
  ``GenevalPromptImageDataset`` reads), a path relative to the dataset folder there (``image_root`` here);
  as a service, the pixels the client sent in its place (``service.wire``). Opened with PIL,
  ``.convert("RGB")``, resized with PIL's default filter (bicubic) to the generated size (FlowCPS resizes
  it to ``config.resolution``, the size it generates at: ``ref_image.resize((res, res))``), then
  ``torch.tensor(uint8) / 255``;
- both through the anchor's ``get_image_transform``: torchvision ``Resize(shortest_edge)`` (bilinear,
  antialiased) on the tensors, ``CenterCrop(crop_size)``, ``Normalize(mean, std)`` — not the processor's
  PIL path the other CLIP rewards use;
- ``get_image_features`` of each, L2-normalised, ``diag(gen @ ref.T)``: the cosine, in [-1, 1].

Each reference's embedding is computed once per (path, generated size) and kept for the reward's life
(a GRPO group shares one reference; a few KiB each), so a batch costs one CLIP forward per new reference
and one per generated image. A reference file changed during a run is not re-read.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from fastcps.edit_images import SOURCE_IMAGES
from fastcps.rewards import DType, RewardArgs
from fastcps.rewards._util import (
    autocast,
    batches,
    check_inputs,
    from_pretrained,
    resolve_device,
    resolve_dtype,
    resolve_weights,
)
from fastcps.rewards.service.wire import SOURCE_PIXELS

__all__ = ["ImageSimilarityReward", "clip_tensor_transform"]

log = logging.getLogger("fastcps.rewards.image_similarity")

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


def _size(size):
    """The anchor's ``get_size``: an int, ``{height, width}`` or ``{shortest_edge}``."""
    if isinstance(size, int):
        return (size, size)
    if "height" in size and "width" in size:
        return (size["height"], size["width"])
    if "shortest_edge" in size:
        return size["shortest_edge"]
    raise ValueError(f"image processor size {size!r}: expected an int, height/width or shortest_edge")


def clip_tensor_transform(image_processor):
    """FlowCPS ``clip_scorer.get_image_transform``: the processor's settings as torchvision transforms on
    float tensors in [0, 1] (resize, center crop, normalise; no rescale: the tensors are rescaled already)."""
    import torch.nn as nn
    import torchvision.transforms as T

    cfg = image_processor.to_dict()
    resize = T.Resize(_size(cfg.get("size"))) if cfg.get("do_resize") else nn.Identity()
    crop = T.CenterCrop(_size(cfg.get("crop_size"))) if cfg.get("do_center_crop") else nn.Identity()
    norm = (
        T.Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
        if cfg.get("do_normalize")
        else nn.Identity()
    )
    return T.Compose([resize, crop, norm])


class ImageSimilarityReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]``: cosine of CLIP image embeddings of
    each image and the reference image ``metadata[i][key]``."""

    name = "image_similarity"

    class Args(RewardArgs):
        model: str = DEFAULT_MODEL
        """CLIPModel path or hub id (FlowCPS: openai/clip-vit-large-patch14)."""
        processor: str = DEFAULT_MODEL
        """CLIPProcessor path or hub id: its image size, crop, mean and std."""
        key: str | None = None
        """Metadata key holding each prompt's reference image path. None (default): an edit row's resolved
        source image (`source_images[0]`, set by the prompt loader) when the row has one, else "image"
        (FlowCPS's jsonl rows)."""
        image_root: str | None = None
        """Folder that relative reference paths are resolved against (FlowCPS: the dataset folder holding
        the metadata .jsonl); None = the directory the run is launched from."""
        resize_reference: bool = True
        """Resize each reference to the generated image's size with PIL's bicubic filter first, as FlowCPS
        does (it resizes references to the generation resolution); false = CLIP's resize only."""
        device: str | None = None
        """None = the images' device."""
        dtype: DType = "float32"
        """float32 (the anchor's precision) | float16 | bfloat16 | amp; half precisions are for CUDA."""
        batch_size: int = 16
        """Images per CLIP forward."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        processor: str = DEFAULT_MODEL,
        key: str | None = None,
        image_root: str | None = None,
        resize_reference: bool = True,
        device=None,
        dtype: str | None = "float32",
        batch_size: int = 16,
    ):
        self.model_id, self.processor_id = model, processor
        self.key, self.image_root, self.resize_reference = key, image_root, bool(resize_reference)
        self.device, self.dtype, self.batch_size = device, dtype, int(batch_size)
        self._model = self._transform = None
        # (resolved path, H, W) -> normalised embedding [D] (fp32); H = W = 0 without resize_reference
        self._ref_cache: dict[tuple[str, int, int], torch.Tensor] = {}

    @classmethod
    def files(cls, args: dict) -> list:
        """The hub repos (or local paths) of ``model`` and ``processor``, and ``image_root`` when set (the
        references themselves are named per prompt: they are opened at the first call)."""
        from fastcps.fetch.items import (
            IMAGE_PROCESSOR,
            LocalPath,
            local_or_hub,
            transformers_model,
            transformers_processor,
        )

        a = cls.Args.model_validate(args)
        items = [
            local_or_hub(a.model, "model", "CLIPModel (image features)", transformers_model),
            local_or_hub(
                a.processor,
                "processor",
                "CLIP processor: image size, crop, mean and std",
                lambda *r: transformers_processor(*r, IMAGE_PROCESSOR),
            ),
        ]
        if a.image_root is not None:
            items.append(LocalPath(a.image_root, "image_root", "folder of the reference images"))
        return items

    def load(self, device) -> None:
        """Load the model now (on ``device`` unless the reward's own ``device`` is set)."""
        self._load(torch.device(self.device if self.device is not None else device))

    def _load(self, device: torch.device):
        if self._model is None:
            from transformers import CLIPModel, CLIPProcessor

            proc, _ = resolve_weights(self.name, "processor", self.processor_id)
            mdl, _ = resolve_weights(self.name, "model", self.model_id)
            processor = from_pretrained(self.name, "processor", CLIPProcessor, proc)
            self._transform = clip_tensor_transform(processor.image_processor)
            model = from_pretrained(self.name, "model", CLIPModel, mdl)
            dt = resolve_dtype(self.name, self.dtype, device)
            self._model = model.to(device=device, dtype=dt).eval().requires_grad_(False)
        elif next(self._model.parameters()).device != device:
            self._model = self._model.to(device)
        return self._model

    # --- references ---------------------------------------------------------------------------------

    def key_of(self, meta) -> str:
        """The metadata key naming a row's reference: ``key`` when set, else the edit row's
        ``source_images`` when present, else ``"image"``."""
        if self.key is not None:
            return self.key
        return SOURCE_IMAGES if isinstance(meta, dict) and SOURCE_IMAGES in meta else "image"

    def reference_path(self, row: int, prompt: str, meta) -> Path:
        """The reference image path of prompt row ``row``: ``meta[key]`` (a list's first entry: an edit row's
        first source image), under ``image_root`` when relative; a clear error when the key is missing or the
        file does not exist."""
        where = f"reward {self.name!r}: prompt row {row} ({prompt!r})"
        key = self.key_of(meta)
        value = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value in (None, ""):
            which = (
                f"{key!r} (config key rewards[].args.key)"
                if self.key is not None
                else f"{SOURCE_IMAGES!r} (an edit row's image) nor {key!r}"
            )
            raise ValueError(
                f"{where} has no reference image: its metadata has no {which}. Each prompt needs one: an "
                f'edit row {{"prompt": "<instruction>", "image": "src.png"}}, or a .jsonl line '
                f'{{"prompt": "...", "metadata": {{"image": "refs/0001.png"}}}} with rewards[].args.key; '
                f"got metadata keys {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}"
            )
        path = Path(str(value)).expanduser()
        if not path.is_absolute():
            path = Path(self.image_root if self.image_root is not None else ".").expanduser() / path
        if not path.is_file():
            root = (
                f"rewards[].args.image_root = {self.image_root!r}"
                if self.image_root is not None
                else "rewards[].args.image_root is not set: relative paths start at the launch directory"
            )
            raise FileNotFoundError(
                f"{where}: reference image {str(path)!r} (metadata key {key!r} = "
                f"{str(value)!r}) does not exist; {root}"
            )
        return path

    def _open_reference(
        self, row: int, prompt: str, path: Path, hw: tuple[int, int], key: str = "image"
    ) -> torch.Tensor:
        """[3, H, W] in [0, 1] as FlowCPS reads a reference: PIL RGB, resized (bicubic), uint8 / 255."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(
                f"reward {self.name!r}: prompt row {row} ({prompt!r}): reference image {str(path)!r} "
                f"(metadata key {key!r}) cannot be read as an image: {err}"
            ) from err
        if self.resize_reference:
            img = img.resize((hw[1], hw[0]))  # PIL takes (width, height); its default filter: bicubic
        return torch.tensor(np.array(img), dtype=torch.uint8).permute(2, 0, 1) / 255.0

    def _embed(self, model, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Normalised CLIP image embeddings [N, D] (fp32) of float images [N, 3, H, W] in [0, 1]."""
        from fastcps.rewards.pickscore import clip_embed_images

        dt = next(model.parameters()).dtype
        out = []
        for sl in batches(pixels.shape[0], self.batch_size):
            x = self._transform(pixels[sl].to(device, torch.float32)).to(dt)
            with autocast(self.dtype, device):
                emb = clip_embed_images(model, x).float()
            out.append(emb / emb.norm(p=2, dim=-1, keepdim=True))
        return torch.cat(out)

    @property
    def wants_source_images(self) -> bool:
        """As a service (``fastcps.rewards.service``): clients send edit rows' source pixels (the service's
        machine may not have the trainer's files), used in place of the paths."""
        return self.key in (None, SOURCE_IMAGES) and self.resize_reference

    def _reference_key(self, row: int, prompt: str, meta, size) -> tuple:
        """The cache key of a row's reference: its path, or the digest of the source pixels a service
        client sent (``wire.SOURCE_PIXELS``, the file as the client opened and resized it)."""
        pixels = meta.get(SOURCE_PIXELS) if isinstance(meta, dict) else None
        if pixels is not None and self.key_of(meta) == SOURCE_IMAGES:
            if not self.resize_reference:
                raise ValueError(
                    f"reward {self.name!r}: prompt row {row} ({prompt!r}) came with its source image's "
                    "pixels resized to the generated size, but resize_reference is false"
                )
            return ("pixels", hashlib.sha1(np.ascontiguousarray(pixels)).hexdigest(), *size)
        return (str(self.reference_path(row, prompt, meta)), *size)

    def _load_reference(self, row: int, prompt: str, meta, key: tuple, hw) -> torch.Tensor:
        if key[0] == "pixels":
            pixels = torch.as_tensor(meta[SOURCE_PIXELS])
            if tuple(pixels.shape) != (3, *hw):
                raise ValueError(
                    f"reward {self.name!r}: prompt row {row} ({prompt!r}): its source pixels are "
                    f"{list(pixels.shape)}, the generated images [3, {hw[0]}, {hw[1]}]"
                )
            return pixels / 255.0  # as _open_reference: uint8 / 255
        return self._open_reference(row, prompt, Path(key[0]), hw, self.key_of(meta))

    def _reference_embeddings(self, model, prompts, metadata, hw, device) -> torch.Tensor:
        size = hw if self.resize_reference else (0, 0)  # unresized references do not depend on hw
        keys = [self._reference_key(i, p, m, size) for i, (p, m) in enumerate(zip(prompts, metadata))]
        new = list(dict.fromkeys(k for k in keys if k not in self._ref_cache))
        if new:
            first_row = {k: keys.index(k) for k in new}
            refs = [
                self._load_reference(first_row[k], prompts[first_row[k]], metadata[first_row[k]], k, hw)
                for k in new
            ]
            if len({tuple(r.shape) for r in refs}) > 1:  # resize_reference=false: sizes may differ
                emb = torch.cat([self._embed(model, r[None], device) for r in refs])
            else:
                emb = self._embed(model, torch.stack(refs), device)
            self._ref_cache.update(zip(new, emb))
            log.debug("image_similarity: %d new reference(s), %d cached", len(new), len(self._ref_cache))
        return torch.stack([self._ref_cache[k].to(device) for k in keys])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        if metadata is None:
            raise ValueError(
                f"reward {self.name!r} needs each prompt's metadata (its reference image under "
                f"{self.key or SOURCE_IMAGES!r}); got none"
            )
        check_inputs(self.name, images, prompts, metadata)
        device = resolve_device(self.device, images)
        model = self._load(device)
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        ref = self._reference_embeddings(model, prompts, metadata, hw, device)
        gen = self._embed(model, images.detach(), device)
        return (gen * ref).sum(-1).float().to(images.device)
