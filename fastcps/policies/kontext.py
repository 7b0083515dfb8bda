"""FLUX.1 Kontext [dev] (image editing) through diffusers' ``FluxKontextPipeline`` components: the same
subfolders, text encoders, VAE, packing, timestep casts and decode as FLUX.1-dev (``fastcps.policies.flux``);
what differs is the source image, as ``FluxKontextPipeline.__call__`` (diffusers 0.42) and FlowCPS
(IamCreateAI/FlowCPS scripts/train_flux_kontext.py, flow_grpo/diffusers_patch/
flux_kontext_pipeline_with_logprob.py) feed it:

- the source image is loaded as FlowCPS loads it, ``Image.open(...).convert("RGB").resize((res, res))``
  (``fastcps.edit_images.load_image``: the anchor resizes to the run's square resolution, where the stock
  pipeline would pick one of its ``PREFERRED_KONTEXT_RESOLUTIONS``, 1024 x 1024 for a square image, four
  times the tokens; the equality test calls the pipeline with ``max_area=res², _auto_resize=False``, which is
  what FlowCPS's patched pipeline does), mapped to [-1, 1] and VAE-encoded as ``_encode_vae_image`` does:
  the latent distribution's mode (``sample_mode="argmax"``, no noise), ``(z - shift_factor) ·
  scaling_factor``, packed 2x2 like the target: ``image_latents`` (1, L, 64) per prompt in the
  conditioning bundle, encoded once per (instruction, image) by the prompt cache;
- every transformer call sees ``[target tokens; source tokens]`` on the token axis, the source's RoPE ids
  (1, row, col) (the target's are (0, row, col)); the velocity is the output's first L tokens;
- the guidance embedding gets 2.5 (FlowCPS's ``guidance_scale`` and the model card's), unless
  ``policy.guidance`` says otherwise;
- the dynamic shift ``mu`` is computed from the target's token count only (the pipeline's
  ``image_seq_len = latents.shape[1]`` before the source is appended): ``FluxPolicy.sigmas`` as is.

The VAE runs in fp32 for the encode as for the decode (FlowCPS casts it to bf16 for both; flow_grpo keeps
it fp32): the reference tokens are then cast to ``policy.dtype`` with the target's.
"""

from __future__ import annotations

import torch

from fastcps.conditioning import Cond, expand_cond
from fastcps.edit_images import SOURCE_IMAGES, ImageCache
from fastcps.policies.families import KONTEXT_LORA_TARGETS
from fastcps.policies.flux import FluxPolicy

IMAGE_LATENTS = "image_latents"  # the conditioning key of the source image's packed latents
KONTEXT_GUIDANCE = 2.5  # FlowCPS counting_flux_kontext's guidance_scale; FluxKontextPipeline's docs too


class FluxKontextPolicy(FluxPolicy):
    family = "FLUX.1 Kontext"
    example = "black-forest-labs/FLUX.1-Kontext-dev"
    editing = True
    default_lora_targets = KONTEXT_LORA_TARGETS  # FlowCPS's: FLUX's plus the single blocks' proj_mlp

    def __init__(self, cfg, device="cpu", zero_stage: int = 0):
        super().__init__(cfg, device, zero_stage)
        if not self.transformer.config.guidance_embeds:
            raise ValueError(
                f"{self.path} (config key `policy.pretrained`) has no guidance embedding: FLUX.1 Kontext "
                "[dev] is guidance-distilled; give a FLUX.1-Kontext-dev pipeline folder or hub id"
            )
        if cfg.guidance is None:
            self.guidance = KONTEXT_GUIDANCE
        # the source's ids: the target's with the first coordinate 1 (prepare_latents' image_ids[..., 0] = 1)
        self.source_ids = self.img_ids.clone()
        self.source_ids[:, 0] = 1
        self.joint_ids = torch.cat([self.img_ids, self.source_ids])
        # decoded source images in host memory (counting_edit edits each image up to three ways)
        self.images = ImageCache(self.resolution)

    # --- the source image -------------------------------------------------------------------------
    def _source_refs(self, prompts: list[str], metadata: list[dict] | None) -> list[str]:
        """Each prompt's one source image; ValueError naming the prompt otherwise."""
        metadata = [{}] * len(prompts) if metadata is None else list(metadata)
        if len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")
        refs = []
        for prompt, meta in zip(prompts, metadata):
            images = (meta or {}).get(SOURCE_IMAGES)
            if not images:
                raise ValueError(
                    f"prompt {prompt!r} has no source image: policy.name = 'kontext' edits images, every "
                    'prompt row needs one ({"prompt": "<instruction>", "image": "path/or/url.jpg"})'
                )
            if len(images) != 1:
                raise ValueError(
                    f"prompt {prompt!r} has {len(images)} source images; FLUX.1 Kontext [dev] "
                    "(FluxKontextPipeline) edits one: give one image per row"
                )
            refs.append(images[0])
        return refs

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents (B, L, 64) of images [B, 3, res, res] in [0, 1], as
        ``FluxKontextPipeline`` makes them: ``preprocess``'s ``2x - 1``, the VAE's mode (argmax: no
        noise), ``(z - shift_factor) · scaling_factor``, 2x2 packing."""
        from diffusers import FluxKontextPipeline

        c = self.vae.config
        out = []
        for part in pixels.split(self.decode_chunk):
            x = part.to(self.device, self.vae.dtype) * 2.0 - 1.0
            z = self.vae.encode(x).latent_dist.mode()
            z = (z - c.shift_factor) * c.scaling_factor
            b, ch, h, w = z.shape
            out.append(FluxKontextPipeline._pack_latents(z, b, ch, h, w))
        return torch.cat(out)

    # --- Policy interface -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        refs = self._source_refs(prompts, metadata)  # before any encoder runs: a bad row fails first
        cond = super().encode(prompts, metadata)
        pixels = torch.stack([self.images.get(r) for r in refs])
        cond[IMAGE_LATENTS] = self.encode_images(pixels).to(self.dtype)
        return cond

    def _image_tokens(self, latents: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        if IMAGE_LATENTS not in cond:
            raise ValueError(
                f"the kontext policy's conditioning needs {IMAGE_LATENTS!r} (the source image's latents from "
                "encode(prompts, metadata)); got keys " + ", ".join(sorted(cond))
            )
        source = expand_cond({IMAGE_LATENTS: cond[IMAGE_LATENTS]}, latents.shape[0])[IMAGE_LATENTS]
        if source.shape[1:] != latents.shape[1:]:
            raise ValueError(
                f"source image latents {tuple(source.shape)} do not match the target's "
                f"{tuple(latents.shape)}: both are packed at policy.resolution = {self.resolution}"
            )
        return torch.cat([latents, source.to(latents.device, latents.dtype)], 1), self.joint_ids
