"""``pickscore``: PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on human preferences.

score = ``logit_scale.exp() · cos(text_embedding, image_embedding)``, reported unscaled as in the paper
(≈ 22 for FLUX.1-dev, 22.06 → 24.25 with CPS). ``scale`` multiplies it (e.g. 1/26 as Flow-GRPO trains).

Images [B, 3, H, W] in [0, 1] are scored as flow_grpo's ``pickscore_score`` scores them: their 8-bit levels
(``(images * 255).round()``) through the CLIP processor as transformers 4.40 ran it, with PIL (resize of
the short side, center crop, rescale, normalization; ``_util.hf_pixel_values``); texts are truncated to
77 tokens. The model is a transformers
``CLIPModel`` loaded on first call on the images' device (or ``device``), eval mode, no grad.

Precision: float32 by default, as the anchors score (none runs it in bf16): flow_grpo
``flow_grpo/rewards.py`` ``pickscore_score``: ``PickScoreScorer(dtype=torch.float32, device=device)``, whose
``flow_grpo/pickscore_scorer.py`` casts the model to that dtype and runs it without autocast; DanceGRPO
``fastvideo/train_grpo_flux.py``: ``AutoModel.from_pretrained("yuvalkirstain/PickScore_v1")`` (fp32), no
autocast. ``dtype`` (float16 | bfloat16 | amp) trades that agreement for memory and speed.
"""

from __future__ import annotations

import torch

from fastcps.rewards import DType, RewardArgs
from fastcps.rewards._util import (
    autocast,
    batches,
    check_inputs,
    from_pretrained,
    hf_pixel_values,
    resolve_device,
    resolve_dtype,
    resolve_weights,
)

__all__ = ["PickScoreReward", "clip_scores"]

DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"


def clip_embed_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings of a transformers CLIPModel (works across transformers 4 and 5)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def clip_embed_texts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def clip_scores(model, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
    """Per-pair ``logit_scale.exp() * cos`` [B] for B images and their B texts."""
    img = clip_embed_images(model, pixel_values).float()
    txt = clip_embed_texts(model, input_ids, attention_mask).float()
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp().float() * (img * txt).sum(-1)


class PickScoreReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` (fp32, on the images' device).

    Args (config ``rewards[].args``):
      ``model``: CLIPModel path or hub id (``yuvalkirstain/PickScore_v1``).
      ``processor``: CLIPProcessor path or hub id (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
      ``device``: None = the images' device.  ``dtype``: float32 | float16 | bfloat16 | amp (float32, the
      anchors' precision; half precisions are meant for CUDA, float16 and amp are float32 on CPU).
      ``batch_size``: images per forward (16).  ``scale``: multiplies the score (1.0 = paper's scale).
      ``max_length``: text tokens (77).
    Hub ids load with ``local_files_only`` when ``HF_HUB_OFFLINE=1``; a missing local path raises
    FileNotFoundError naming the reward and the config key.
    """

    name = "pickscore"

    class Args(RewardArgs):
        model: str = DEFAULT_MODEL
        """CLIPModel path or hub id."""
        processor: str = DEFAULT_PROCESSOR
        """CLIPProcessor path or hub id."""
        device: str | None = None
        """None = the images' device."""
        dtype: DType = "float32"
        """float32 (the anchors' precision) | float16 | bfloat16 | amp; half precisions are for CUDA."""
        batch_size: int = 16
        """Images per forward."""
        scale: float = 1.0
        """Multiplies the score (1.0 = the paper's scale)."""
        max_length: int = 77
        """Text tokens."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        processor: str = DEFAULT_PROCESSOR,
        device=None,
        dtype: str | None = "float32",
        batch_size: int = 16,
        scale: float = 1.0,
        max_length: int = 77,
    ):
        self.model_id, self.processor_id = model, processor
        self.device, self.dtype, self.batch_size = device, dtype, int(batch_size)
        self.scale, self.max_length = float(scale), int(max_length)
        self._model = self._processor = None

    @classmethod
    def files(cls, args: dict) -> list:
        """The hub repos (or local paths) of ``model`` and ``processor`` (``python -m fastcps.fetch``)."""
        from fastcps.fetch.items import (
            IMAGE_PROCESSOR,
            local_or_hub,
            transformers_model,
            transformers_processor,
        )

        a = cls.Args.model_validate(args)
        return [
            local_or_hub(a.model, "model", "PickScore CLIPModel", transformers_model),
            local_or_hub(
                a.processor,
                "processor",
                "CLIP processor: image processor and tokenizer",
                lambda *r: transformers_processor(*r, IMAGE_PROCESSOR, "tokenizer_config.json"),
            ),
        ]

    def load(self, device) -> None:
        """Load the model now (on ``device`` unless the reward's own ``device`` is set), not at the first
        call."""
        self._load(torch.device(self.device if self.device is not None else device))

    def _load(self, device: torch.device):
        if self._model is None:
            from transformers import CLIPModel, CLIPProcessor

            proc, _ = resolve_weights(self.name, "processor", self.processor_id)
            mdl, _ = resolve_weights(self.name, "model", self.model_id)
            self._processor = from_pretrained(self.name, "processor", CLIPProcessor, proc)
            model = from_pretrained(self.name, "model", CLIPModel, mdl)
            dt = resolve_dtype(self.name, self.dtype, device)
            self._model = model.to(device=device, dtype=dt).eval().requires_grad_(False)
        elif next(self._model.parameters()).device != device:
            self._model = self._model.to(device)
        return self._model, self._processor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        check_inputs(self.name, images, prompts, metadata)
        device = resolve_device(self.device, images)
        model, processor = self._load(device)
        dt = next(model.parameters()).dtype
        out = []
        for sl in batches(images.shape[0], self.batch_size):
            pix = hf_pixel_values(processor.image_processor, images[sl])
            tok = processor.tokenizer(
                list(prompts[sl]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            mask = tok.get("attention_mask")
            with autocast(self.dtype, device):
                out.append(
                    clip_scores(
                        model,
                        pix.to(device, dt),
                        tok["input_ids"].to(device),
                        None if mask is None else mask.to(device),
                    )
                )
        return (torch.cat(out) * self.scale).float().to(images.device)
