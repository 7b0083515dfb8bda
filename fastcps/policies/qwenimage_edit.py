"""Qwen-Image-Edit through diffusers' ``QwenImageEditPipeline`` components (Qwen-Image's transformer, VAE
and scheduler; Qwen2.5-VL-7B reading the instruction AND the source image through the ``processor``).

What editing adds to ``fastcps.policies.qwenimage`` (whose CFG-with-rescale, masks, timestep cast, schedule
and decode it keeps), as ``QwenImageEditPipeline.__call__`` does it (diffusers 0.42) and FlowCPS trains it
(IamCreateAI/FlowCPS scripts/train_qwenimage_edit.py, flow_grpo/diffusers_patch/
qwenimage_edit_pipeline_with_logprob.py):
- the source image is loaded as FlowCPS does (``fastcps.edit_images.load_image`` at ``policy.resolution``:
  FlowCPS resizes every reference to ``config.resolution``), then resized as the pipeline does to the size
  ``calculate_dimensions(1024 * 1024, w / h)`` gives (1024 x 1024 for a square source: the reference's size
  is the pipeline's area target, not the output's);
- text: the edit template through the processor (the image's vision tokens inside the user turn), the VL
  model's last hidden state past the template's first 64 tokens: the sequence keeps the image tokens. No cut
  at ``max_sequence_length``: the edit pipeline has none;
- the negative prompt " " is encoded WITH the same image (the pipeline's negative sees it too), so it is per
  (instruction, image), in the bundle (``negative_encoder_hidden_states``): its length is the same for every
  prompt (one template, one reference size), so it is a fixed-length key of the conditioning contract;
- the reference: VAE ``argmax`` latents normalised ``(z - mean) / std``, packed 2x2 (``image_latents``); the
  transformer sees ``[target; reference]`` tokens with ``img_shapes = [target, reference]`` and its output
  is cut to the target's tokens, for the prompt and the negative alike.
"""

from __future__ import annotations

import torch

from fastcps.conditioning import Cond
from fastcps.edit_images import SOURCE_IMAGES, ImageCache
from fastcps.policies.qwenimage import MASK, QwenImagePolicy

NEGATIVE = "negative_encoder_hidden_states"
REFERENCE = "image_latents"
REFERENCE_AREA = 1024 * 1024  # QwenImageEditPipeline: calculate_dimensions(1024 * 1024, ratio)


class QwenImageEditPolicy(QwenImagePolicy):
    family = "Qwen-Image-Edit"
    example = "Qwen/Qwen-Image-Edit"
    subfolders = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
    editing = True

    def __init__(self, cfg, device="cpu", zero_stage: int = 0):
        super().__init__(cfg, device, zero_stage)
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        # every source is loaded square at policy.resolution (FlowCPS), so one reference size serves all
        ref_w, ref_h, _ = calculate_dimensions(REFERENCE_AREA, 1.0)
        self.reference_size = (ref_h, ref_w)
        packed = self.vae_scale_factor * 2
        self.reference_shape = (1, ref_h // packed, ref_w // packed)
        self.reference_tokens = self.reference_shape[1] * self.reference_shape[2]
        self._images = ImageCache(self.resolution)

    def _pipeline(self, **components):
        from diffusers import QwenImageEditPipeline
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(self.path, subfolder="processor")
        return QwenImageEditPipeline(processor=processor, **components)

    # --- conditioning: (instruction, source image) --------------------------------------------------
    def _source(self, prompt: str, meta: dict):
        """The prompt's source image as the PIL picture the pipeline resizes (FlowCPS's load, exact: the
        cache's uint8 pixels)."""
        from PIL import Image

        refs = (meta or {}).get(SOURCE_IMAGES)
        if not refs:
            raise ValueError(
                f"prompt {prompt!r} has no source image: Qwen-Image-Edit edits an image; give the row an "
                '"image" (fastcps.edit_images)'
            )
        if len(refs) != 1:
            raise ValueError(f"prompt {prompt!r} has {len(refs)} source images; Qwen-Image-Edit takes one")
        pixels = (self._images.get(refs[0]) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())

    def _encode_text(self, prompt: str, image) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=[prompt], image=image, device=self.device)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds.to(self.dtype), mask.to(torch.long)

    def _encode_reference(self, image) -> torch.Tensor:
        """The reference's normalised VAE latents, packed: (1, reference_tokens, 64)."""
        h, w = self.reference_size
        pixels = self.pipe.image_processor.preprocess(image, h, w).unsqueeze(2)
        z = self.pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None)
        packed = self.pipe._pack_latents(z, 1, z.shape[1], z.shape[3], z.shape[4])
        return packed.to(self.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        metadata = [{}] * len(prompts) if metadata is None else list(metadata)
        if len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")
        h, w = self.reference_size
        texts, masks, negatives, references = [], [], [], []
        with self._encoders_on_device():
            for prompt, meta in zip(prompts, metadata):
                image = self.pipe.image_processor.resize(self._source(prompt, meta), h, w)
                embeds, mask = self._encode_text(prompt, image)
                texts.append(embeds[0])
                masks.append(mask[0])
                if self.cfg_scale is not None:
                    negatives.append(self._encode_text(self.negative_prompt, image)[0][0])
                references.append(self._encode_reference(image))
        length = max(t.shape[0] for t in texts)
        cond = {
            "encoder_hidden_states": torch.stack([_pad(t, length) for t in texts]),
            MASK: torch.stack([_pad(m, length) for m in masks]),
            REFERENCE: torch.cat(references),
        }
        if negatives:
            if len({n.shape[0] for n in negatives}) > 1:  # one template and one image size: one length
                raise ValueError(
                    f"negative prompt encodings of different lengths {[len(n) for n in negatives]}"
                )
            cond[NEGATIVE] = torch.stack(negatives)
        return cond

    def text_token_counts(self, prompts: list[str]) -> None:
        return None  # the edit pipeline cuts nothing at max_sequence_length: no truncation to warn about

    # --- the transformer's inputs -------------------------------------------------------------------
    def _negative_batch(self, cond: Cond, b: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        if NEGATIVE not in cond:
            raise ValueError(
                f"policy.cfg_scale is set but the conditioning has no {NEGATIVE!r}: encode again"
            )
        neg = cond[NEGATIVE].to(dev, self.dtype)
        return neg, torch.ones(neg.shape[:2], dtype=torch.long, device=dev)

    def _with_reference(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, list[tuple]]:
        ref = cond[REFERENCE].to(x.device, x.dtype)
        if tuple(ref.shape[1:]) != (self.reference_tokens, self.channels):
            raise ValueError(
                f"{REFERENCE} must be [B, {self.reference_tokens}, {self.channels}] (the reference at "
                f"{self.reference_size} px), got {tuple(ref.shape)}"
            )
        return torch.cat([x, ref], 1), [self.img_shape, self.reference_shape]


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (T, ...) zero-padded on dim 0 to ``length``."""
    return torch.cat([t, t.new_zeros((length - t.shape[0], *t.shape[1:]))]) if t.shape[0] < length else t
