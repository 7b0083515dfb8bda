"""GenEval's colour classifier: open_clip CLIP ViT-L-14 with OpenAI's weights, zero-shot over GenEval's ten
colours on each object's masked crop (djghosh13/geneval ``evaluation/evaluate_images.py``).

- Model: ``open_clip.create_model_and_transforms(clip_arch, pretrained="openai")`` with ``clip_arch =
  "ViT-L-14"``. GenEval pins open_clip 2.20, whose ``pretrained="openai"`` builds OpenAI's model with
  QuickGELU in fp32 (``load_openai_model``); open_clip 3 builds the plain ``ViT-L-14`` config (GELU) for the
  same tag and only warns, so the tag's ``quick_gelu`` is forced here.
- Crop (``ImageCrops.__getitem__``): ``image = Image.composite(self._image, self._blank,
  Image.fromarray(mask))`` with ``self._blank = Image.new("RGB", image.size, color="#999")``, then
  ``image = image.crop(box[:4])``, then ``transform(image)`` (open_clip's eval transform: bicubic resize of
  the short side to 224, centre crop, OpenAI mean/std).
- Classifier (``color_classification``): clip_benchmark 1.4.0 ``zero_shot_classifier(clip_model, tokenizer,
  COLORS, [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}", f"a photo of a {{c}}
  object"], DEVICE)``: per colour the templates' text embeddings, each normalised, averaged, normalised;
  ``run_classification``: ``logits = 100. * F.normalize(image_features) @ classifier``, the colour is the
  argmax. Both under ``torch.cuda.amp.autocast()`` (clip_benchmark's ``amp=True``): ``dtype="amp"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastcps.rewards._util import (
    autocast,
    batches,
    hub_kwargs,
    hub_load_error,
    resolve_dtype,
    resolve_weights,
)
from fastcps.rewards.geneval.rules import COLORS

__all__ = ["BACKGROUND", "TEMPLATES", "ColorClassifier", "clip_checkpoint_item", "crop_object"]

logger = logging.getLogger("fastcps.rewards.geneval")

TEMPLATES = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)
BACKGROUND = (0x99, 0x99, 0x99)  # PIL's "#999": each hex digit doubled
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# the files open_clip's download_pretrained_from_hf looks for, safetensors first
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def crop_object(image: torch.Tensor, box, mask: torch.Tensor | None) -> np.ndarray:
    """uint8 [3,H,W] image, box (x1, y1, x2, y2) in pixels, bool [H,W] mask -> uint8 [h,w,3]: the object's
    pixels on ``BACKGROUND`` inside its box, as GenEval's ``ImageCrops`` makes it with PIL (``composite``
    then ``crop``: columns x1..x2-1, rows y1..y2-1; PIL rounds the box to integers)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    if mask is not None:
        grey = torch.tensor(BACKGROUND, dtype=image.dtype, device=image.device).view(3, 1, 1)
        image = torch.where(mask.to(image.device)[None], image, grey)
    return image[:, y1:y2, x1:x2].permute(1, 2, 0).cpu().numpy()


def is_tag(clip_pretrained: str) -> bool:
    """An open_clip pretrained tag ("openai", "laion2b_s32b_b82k"): no such file here, no folder, no
    suffix; anything else is a local checkpoint file."""
    p = Path(str(clip_pretrained)).expanduser()
    return not p.exists() and "/" not in str(clip_pretrained) and not p.suffix


def clip_checkpoint_item(clip_model: str, clip_pretrained: str):
    """``fastcps.fetch`` item of the CLIP weights: a local file, or the hub repo of open_clip's tag."""
    from fastcps.fetch.items import HubRepo, LocalPath

    if not is_tag(clip_pretrained):
        return LocalPath(clip_pretrained, "clip_pretrained", "open_clip checkpoint (colour classifier)")
    repo, fname = _hub_location(clip_model, clip_pretrained)
    files = (fname,) if fname else HUB_WEIGHTS
    return HubRepo(
        repo,
        "clip_pretrained",
        f"open_clip {clip_model} '{clip_pretrained}' weights (GenEval's colour classifier)",
        allow_patterns=files,
        required=("|".join(files),),
    )


def _hub_location(clip_model: str, tag: str) -> tuple[str, str]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(clip_model, tag)
    if not cfg:
        raise ValueError(
            f"reward 'geneval': open_clip has no pretrained tag {tag!r} for {clip_model!r} (config key "
            f"rewards[].args.clip_pretrained; tags: {open_clip.list_pretrained_tags_by_model(clip_model)}), "
            "or give a local checkpoint file"
        )
    if not cfg.get("hf_hub"):
        raise ValueError(
            f"reward 'geneval': open_clip's {clip_model!r} {tag!r} weights have no Hugging Face hub copy; "
            "download them and give the file as config key rewards[].args.clip_pretrained"
        )
    # "org/repo/" (open_clip's default file names) or "org/repo/file"
    parts = cfg["hf_hub"].split("/")
    return "/".join(parts[:2]), "/".join(p for p in parts[2:] if p)


class ColorClassifier:
    """``classify([(classname, [uint8 crops [h,w,3]]), ...]) -> [[colour, ...], ...]``, one CLIP pass over
    all crops of a class."""

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        clip_config: dict | str | None = None,
        device=None,
        dtype: str | None = "amp",
        batch_size: int = 16,
    ):
        self.clip_model, self.clip_pretrained, self.clip_config = clip_model, clip_pretrained, clip_config
        self.device, self.dtype, self.batch_size = device, dtype, int(batch_size)
        self._model = self._tokenizer = self._transform = None
        self._classifiers: dict[str, torch.Tensor] = {}

    def load(self, device) -> None:
        self._load(torch.device(self.device if self.device is not None else device))

    def _checkpoint(self) -> str:
        if not is_tag(self.clip_pretrained):
            path, _ = resolve_weights("geneval", "clip_pretrained", self.clip_pretrained)
            return path
        from huggingface_hub import hf_hub_download

        repo, fname = _hub_location(self.clip_model, self.clip_pretrained)
        err = None
        for name in (fname,) if fname else HUB_WEIGHTS:
            try:
                return hf_hub_download(repo, name, **hub_kwargs())
            except Exception as e:  # the next format, as open_clip's download_pretrained_from_hf
                err = e
        raise hub_load_error("geneval", "clip_pretrained", f"{repo} ({self.clip_pretrained})", err)

    def _build(self):
        import open_clip

        if self.clip_config is None:
            # a local file of OpenAI's weights needs clip_model "ViT-L-14-quickgelu" (open_clip's config)
            tag = (
                open_clip.get_pretrained_cfg(self.clip_model, self.clip_pretrained)
                if is_tag(self.clip_pretrained)
                else {}
            )
            quick = bool(tag.get("quick_gelu", False))
            model = open_clip.create_model(self.clip_model, pretrained=None, force_quick_gelu=quick)
            tokenizer = open_clip.get_tokenizer(self.clip_model)
            size = open_clip.get_model_config(self.clip_model)["vision_cfg"]["image_size"]
            mean, std = tag.get("mean", OPENAI_MEAN), tag.get("std", OPENAI_STD)
        else:
            cfg = self.clip_config
            if not isinstance(cfg, dict):
                if not Path(cfg).is_file():
                    raise FileNotFoundError(
                        f"reward 'geneval': open_clip model config not found at {str(cfg)!r} "
                        "(config key rewards[].args.clip_config)"
                    )
                cfg = json.loads(Path(cfg).read_text())
            model = open_clip.CLIP(**cfg)
            tokenizer = open_clip.SimpleTokenizer(
                context_length=int(cfg["text_cfg"].get("context_length", 77))
            )
            size, mean, std = cfg["vision_cfg"].get("image_size", 224), OPENAI_MEAN, OPENAI_STD
        transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
        return model, tokenizer, transform

    def _load(self, device: torch.device):
        if self._model is None:
            import open_clip

            path = self._checkpoint()
            model, self._tokenizer, self._transform = self._build()
            try:
                open_clip.load_checkpoint(model, path)
            except RuntimeError as err:
                raise RuntimeError(
                    f"reward 'geneval': CLIP checkpoint {path!r} does not fit {self.clip_model!r} "
                    f"(config keys rewards[].args.clip_model / clip_config): {err}"
                ) from err
            dt = resolve_dtype("geneval", self.dtype, device)
            self._model = model.to(device=device, dtype=dt).eval().requires_grad_(False)
            self._classifiers.clear()
            logger.info("geneval: colour classifier %s on %s (%s)", self.clip_model, device, dt)
        elif next(self._model.parameters()).device != device:
            self._model = self._model.to(device)
            self._classifiers.clear()
        return self._model

    def classifier(self, classname: str, device: torch.device) -> torch.Tensor:
        """[D, 10] zero-shot weights of GenEval's colours for ``classname`` (cached, as GenEval's
        ``COLOR_CLASSIFIERS``)."""
        if classname not in self._classifiers:
            model = self._load(device)
            columns = []
            with autocast(self.dtype, device):
                for c in COLORS:
                    texts = [t.format(c=c, classname=classname) for t in TEMPLATES]
                    emb = F.normalize(model.encode_text(self._tokenizer(texts).to(device)), dim=-1).mean(0)
                    columns.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(columns, dim=1)
        return self._classifiers[classname]

    @torch.no_grad()
    def classify(self, requests: list[tuple[str, list[np.ndarray]]], device) -> list[list[str]]:
        from PIL import Image

        device = torch.device(self.device if self.device is not None else device)
        model = self._load(device)
        dt = next(model.parameters()).dtype
        out: list[list[str]] = [[] for _ in requests]
        by_class: dict[str, list[tuple[int, np.ndarray]]] = {}
        for k, (classname, crops) in enumerate(requests):
            by_class.setdefault(classname, []).extend((k, c) for c in crops)
        for classname, items in by_class.items():
            clf = self.classifier(classname, device)
            preds = []
            for sl in batches(len(items), self.batch_size):
                pix = torch.stack([self._transform(Image.fromarray(c)) for _, c in items[sl]])
                with autocast(self.dtype, device):
                    feats = F.normalize(model.encode_image(pix.to(device, dt)), dim=-1)
                    logits = 100.0 * feats @ clf.to(feats.dtype)
                preds.append(logits.float().argmax(1))
            for (k, _), p in zip(items, torch.cat(preds).tolist()):
                out[k].append(COLORS[p])
        return out
