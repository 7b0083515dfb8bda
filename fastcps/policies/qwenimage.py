"""Qwen-Image through diffusers' ``QwenImagePipeline`` components (``transformer``, ``vae`` =
AutoencoderKLQwenImage, ``text_encoder`` = Qwen2.5-VL-7B, ``tokenizer``, ``scheduler``).

Conventions, as ``QwenImagePipeline.__call__`` does them (diffusers 0.42) and FlowCPS trains them
(IamCreateAI/FlowCPS scripts/train_qwenimage.py and
flow_grpo/diffusers_patch/qwenimage_pipeline_with_logprob.py):
- text: each prompt goes through the pipeline's chat template; Qwen2.5-VL's last hidden state, with the
  template's first 34 tokens (``prompt_template_encode_start_idx``: the system prompt and the user turn's
  header) dropped, is the prompt's sequence: its own length, cut at ``policy.max_sequence_length``
  (``encode_prompt``'s ``[:, :max_sequence_length]``). ``encode`` returns the states and a long mask
  (1 on real tokens), the conditioning contract's variable-length bundle;
- true classifier-free guidance when ``policy.cfg_scale`` > 1: negative prompt " " (FlowCPS's
  ``negative_prompt=[" "]*len(prompts)``), encoded once and kept; prompt and negative padded to a common
  length with their masks and run as one forward of 2B; ``comb = neg + s·(cond − neg)`` rescaled per token
  to the conditional velocity's norm (``comb·‖cond‖/‖comb‖`` over the channels), in rollout and training;
- ``timestep = (1000·σ).to(dtype) / 1000``, the pipeline's casts (as FLUX: ``fastcps.policies.flux``);
  ``img_shapes = [(1, h/16, w/16)]`` per sample; latents packed 2x2 as FLUX's (64 channels);
- schedule: ``schedule.pipeline_sigmas`` with Qwen-Image's scheduler config (dynamic exponential shift
  at the image's token count, ``shift_terminal`` 0.02);
- decode: unpack to the video VAE's 5-D latent (one frame), ``z·latents_std + latents_mean`` per channel
  (the pipeline's ``z / (1/std) + mean``), VAE decode in fp32 (FlowCPS: ``pipeline.vae.to(device,
  dtype=torch.float32)``), the frame, 8-bit levels (``DiffusersPolicy._vae_decode``).
"""

from __future__ import annotations

import torch

from fastcps.conditioning import Cond, expand_cond
from fastcps.policies.families import QWENIMAGE_LORA_TARGETS
from fastcps.policies.flux import DiffusersPolicy, load_component
from fastcps.schedule import pipeline_sigmas

MASK = "encoder_hidden_states_mask"


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (B, T, ...) padded with zeros on dim 1 to ``length`` tokens (a no-op when already there)."""
    if t.shape[1] == length:
        return t
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], 1)


class QwenImagePolicy(DiffusersPolicy):
    family = "Qwen-Image"
    example = "Qwen/Qwen-Image"
    subfolders = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    text_encoder_names = ("text_encoder",)
    default_lora_targets = QWENIMAGE_LORA_TARGETS  # fastcps.policies.families
    negative_prompt = " "  # FlowCPS's (and the pipeline docstring's) negative prompt

    def __init__(self, cfg, device="cpu", zero_stage: int = 0):
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        self.transformer_cls = QwenImageTransformer2DModel
        self.vae_cls = AutoencoderKLQwenImage
        self._load_common(cfg, device, zero_stage)
        if cfg.guidance is not None:
            raise ValueError(
                "policy.guidance is FLUX.1-dev's distilled guidance; Qwen-Image has none: use "
                "policy.cfg_scale for true classifier-free guidance (FlowCPS's recipe: 4)"
            )
        self.cfg_scale = None if cfg.cfg_scale is None or cfg.cfg_scale <= 1.0 else float(cfg.cfg_scale)
        self.pipe = self._pipeline(  # ours trains under DeepSpeed; the pipeline only encodes prompts
            scheduler=load_component(FlowMatchEulerDiscreteScheduler, self.path, "scheduler"),
            vae=self.vae,
            text_encoder=self._frozen_text_encoder(Qwen2_5_VLForConditionalGeneration, "text_encoder"),
            tokenizer=load_component(Qwen2Tokenizer, self.path, "tokenizer"),
            transformer=None,
        )
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.max_sequence_length = int(cfg.max_sequence_length)
        if not 1 <= self.max_sequence_length <= self.pipe.tokenizer_max_length:
            raise ValueError(
                f"policy.max_sequence_length = {self.max_sequence_length}: Qwen-Image takes 1 to "
                f"{self.pipe.tokenizer_max_length} text tokens (FlowCPS: 512, the pipeline's default)"
            )
        lat = self.resolution // self.vae_scale_factor  # 64 at 512 px
        self.num_tokens = (lat // 2) ** 2
        self.channels = self.transformer.config.in_channels  # 64 = 16 latent channels x 2 x 2
        self.img_shape = (1, lat // 2, lat // 2)  # (frames, rows, cols) of the packed image for the RoPE
        self._negative: Cond | None = None
        self._sigma_cache: dict[int, torch.Tensor] = {}

    def _pipeline(self, **components):
        """The diffusers pipeline whose ``encode_prompt`` the policy calls (the edit policy's adds the
        ``processor``)."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(**components)

    # --- the VAE: a video VAE with per-channel statistics -------------------------------------------
    def _vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)  # QwenImagePipeline's: 8

    def _vae_input(self, z: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        shape = (1, c.z_dim, 1, 1, 1)
        mean = torch.tensor(c.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        inv_std = 1.0 / torch.tensor(c.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return z / inv_std + mean  # the pipeline's expression, so the decode sees its values bit for bit

    # --- text ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> Cond:
        with self._encoders_on_device():
            embeds, mask = self.pipe.encode_prompt(
                prompt=list(prompts),
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        if mask is None:  # encode_prompt drops an all-ones mask; the contract keeps it (the cache trims)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds.to(self.dtype), MASK: mask.to(torch.long)}

    @torch.no_grad()
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        if self.cfg_scale is not None and self._negative is None:  # " " once, kept on the policy
            self._negative = self._encode([self.negative_prompt])
        return self._encode(prompts)

    def text_token_counts(self, prompts: list[str]) -> list[int]:
        """Qwen tokens per prompt after the template's 34 are dropped (the user turn's closing
        ``<|im_end|>``, newline and the assistant header included, as ``encode_prompt`` keeps them),
        before the cut at ``max_sequence_length``."""
        template, drop = self.pipe.prompt_template_encode, self.pipe.prompt_template_encode_start_idx
        ids = self.pipe.tokenizer([template.format(p) for p in prompts], truncation=False)["input_ids"]
        return [len(i) - drop for i in ids]

    # --- Policy interface ---------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.num_tokens, self.channels)

    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps not in self._sigma_cache:
            self._sigma_cache[num_steps] = pipeline_sigmas(self.scheduler_config, self.num_tokens, num_steps)
        return self._sigma_cache[num_steps].to(device or self.device)

    def _text_batch(self, cond: Cond, b: int, dev) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states, mask or None) for ``b`` samples, with the negative rows after them under CFG. Padding
        is decided from shapes (host values): no device value is read."""
        cond = expand_cond(cond, b)  # one prompt's conditioning serves every sample
        hidden, mask = cond["encoder_hidden_states"].to(dev, self.dtype), cond.get(MASK)
        mask = None if mask is None else mask.to(dev)
        if self.cfg_scale is None:
            return hidden, mask
        neg_h, neg_m = self._negative_batch(cond, b, dev)
        length = max(hidden.shape[1], neg_h.shape[1])
        if mask is None and hidden.shape[1] == neg_h.shape[1]:
            return torch.cat([hidden, neg_h]), None  # no padding anywhere: the pipeline's mask-free call
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=dev)
        # FlowCPS pads the prompt and the negative to one length and passes both masks (compute_log_prob)
        hidden = torch.cat([_pad_tokens(hidden, length), _pad_tokens(neg_h, length)])
        mask = torch.cat([_pad_tokens(mask, length), _pad_tokens(neg_m, length)])
        return hidden, mask

    def _negative_batch(self, cond: Cond, b: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of the negative prompt for ``b`` samples: " ", encoded once and kept."""
        if self._negative is None:
            raise RuntimeError("QwenImagePolicy.encode must run before velocity when policy.cfg_scale is set")
        neg_h = self._negative["encoder_hidden_states"].to(dev, self.dtype).expand(b, -1, -1)
        return neg_h, self._negative[MASK].to(dev).expand(b, -1)

    def _with_reference(self, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, list[tuple]]:
        """(the transformer's image tokens, their ``img_shapes`` entry) for latents ``x``: the target's own
        (the edit policy appends the reference image's tokens)."""
        return x, [self.img_shape]

    def velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        b = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape():
            raise ValueError(
                f"Qwen-Image latents must be [B, {self.num_tokens}, {self.channels}] (packed at "
                f"{self.resolution} px), got {tuple(latents.shape)}"
            )
        dev, dtype = latents.device, self.dtype
        sigma = torch.as_tensor(sigma, device=dev, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        if sigma.shape[0] != b:
            raise ValueError(f"batch mismatch: latents {b}, sigma {sigma.shape[0]}")
        hidden, mask = self._text_batch(cond, b, dev)
        x, shapes = self._with_reference(latents.to(dtype), expand_cond(cond, b))
        # QwenImagePipeline: t = 1000·σ cast to the latents' dtype, then t / 1000 (as FluxPipeline)
        t = (sigma * 1000.0).to(dtype) / 1000
        if self.cfg_scale is not None:  # one forward of 2B: [prompt; negative], FlowCPS's order
            x, t = torch.cat([x, x]), torch.cat([t, t])
        out = model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * x.shape[0],
            return_dict=False,
        )[0][:, : self.num_tokens].float()  # the target's tokens (reference tokens, if any, follow them)
        if self.cfg_scale is None:
            return out
        cond_v, neg_v = out.chunk(2)
        comb = neg_v + self.cfg_scale * (cond_v - neg_v)
        # the pipeline's rescale: each token's guided velocity keeps the conditional one's norm
        return comb * (torch.norm(cond_v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        z = QwenImagePipeline._unpack_latents(
            latents.float(), self.resolution, self.resolution, self.vae_scale_factor
        )
        return self._vae_decode(z)
