"""SD3.5 (Medium/Large) through diffusers' ``StableDiffusion3Pipeline`` components.

Conventions, as ``StableDiffusion3Pipeline.__call__`` does them (diffusers 0.42):
- latents are the VAE's 16-channel latent, unpacked: ``(16, res/8, res/8)``; the transformer
  patchifies (2x2) itself;
- ``timestep = 1000·σ`` in fp32 whatever the policy's dtype: the scheduler's ``timesteps``, which the
  pipeline passes as they are (unlike FLUX, SD3's transformer does not scale it);
- conditioning: the two CLIPs' penultimate states concatenated, padded to T5's width and joined
  with T5's tokens; pooled = both CLIPs' projected embeddings (``encode_prompt``);
- schedule: ``schedule.pipeline_sigmas`` with the checkpoint's static shift (3): the base grid
  ``linspace(1, 1/N, N)`` as for FLUX (docs/math.md), shifted, plus the trailing 0. The stock pipeline's
  ``set_timesteps(N)`` grid instead ends at σ ≈ 0.009 (shifted twice from σ_min = 1/1000), which at
  6 steps spends the last step on 0.009 → 0 after a 0.43 → 0.009 jump;
- true classifier-free guidance when ``policy.cfg_scale`` is set (> 1): every velocity runs the
  batch twice (negative prompt "" and the prompt) and returns ``v_u + s·(v_c − v_u)``, in rollout
  and in training alike (flow_grpo's SD3.5 recipe: 4.5), so the log-probs see the guided velocity;
- decode: ``z / scaling_factor + shift_factor``, VAE decode in fp32 (flow_grpo's), to [0, 1], quantised to
  the 8-bit levels a saved image holds (``DiffusersPolicy.decode``).
"""

from __future__ import annotations

import torch

from fastcps.policies.base import Cond
from fastcps.policies.families import SD3_LORA_TARGETS
from fastcps.policies.flux import DiffusersPolicy, load_component
from fastcps.schedule import pipeline_sigmas


class SD3Policy(DiffusersPolicy):
    family = "SD3"
    example = "stabilityai/stable-diffusion-3.5-medium"
    subfolders = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    )
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_tokenizer_name = "tokenizer_3"
    default_lora_targets = SD3_LORA_TARGETS  # fastcps.policies.families

    def __init__(self, cfg, device="cpu", zero_stage: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.transformer_cls = SD3Transformer2DModel
        self._load_common(cfg, device, zero_stage)
        if cfg.guidance is not None:
            raise ValueError(
                "policy.guidance is FLUX.1-dev's distilled guidance; SD3 has none: use "
                "policy.cfg_scale for true classifier-free guidance"
            )
        self.cfg_scale = None if cfg.cfg_scale is None or cfg.cfg_scale <= 1.0 else float(cfg.cfg_scale)
        self.pipe = StableDiffusion3Pipeline(
            scheduler=load_component(FlowMatchEulerDiscreteScheduler, self.path, "scheduler"),
            vae=self.vae,
            text_encoder=self._frozen_text_encoder(CLIPTextModelWithProjection, "text_encoder"),
            tokenizer=load_component(CLIPTokenizer, self.path, "tokenizer"),
            text_encoder_2=self._frozen_text_encoder(CLIPTextModelWithProjection, "text_encoder_2"),
            tokenizer_2=load_component(CLIPTokenizer, self.path, "tokenizer_2"),
            text_encoder_3=self._frozen_text_encoder(T5EncoderModel, "text_encoder_3"),
            tokenizer_3=load_component(T5TokenizerFast, self.path, "tokenizer_3"),
            transformer=None,
        )
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.max_sequence_length = int(cfg.max_sequence_length)
        lat = self.resolution // self.vae_scale_factor
        self.shape = (self.transformer.config.in_channels, lat, lat)
        self._negative: Cond | None = None
        self._sigma_cache: dict[int, torch.Tensor] = {}

    def _encode(self, prompts: list[str]) -> Cond:
        with self._encoders_on_device():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    @torch.no_grad()
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        if self.cfg_scale is not None and self._negative is None:  # "" once, kept on the policy
            self._negative = self._encode([""])
        return self._encode(prompts)

    def latent_shape(self) -> tuple[int, ...]:
        return self.shape

    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps not in self._sigma_cache:
            tokens = (self.resolution // self.vae_scale_factor // 2) ** 2  # read only by a dynamic shift
            self._sigma_cache[num_steps] = pipeline_sigmas(
                self.scheduler_config, tokens, num_steps, default_shift=3.0
            )
        return self._sigma_cache[num_steps].to(device or self.device)

    def velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        b = latents.shape[0]
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(
                f"SD3 latents must be [B, {', '.join(map(str, self.shape))}] at {self.resolution} px, "
                f"got {tuple(latents.shape)}"
            )
        sigma, hidden, pooled = self.batch_inputs(latents, sigma, cond)
        dev, dtype = latents.device, self.dtype
        x = latents.to(dtype)
        if self.cfg_scale is not None:  # one forward of 2B: [negative; prompt]
            if self._negative is None:
                raise RuntimeError("SD3Policy.encode must run before velocity when policy.cfg_scale is set")
            neg_h = self._negative["encoder_hidden_states"].to(dev, dtype).expand(b, -1, -1)
            neg_p = self._negative["pooled_projections"].to(dev, dtype).expand(b, -1)
            x = torch.cat([x, x])
            sigma = torch.cat([sigma, sigma])
            hidden = torch.cat([neg_h, hidden.to(dev, dtype)])
            pooled = torch.cat([neg_p, pooled.to(dev, dtype)])
        out = model(
            hidden_states=x,
            # the scheduler's t = 1000·σ in fp32, as StableDiffusion3Pipeline passes it: the transformer
            # computes its sinusoidal embedding from this value in fp32 (in bf16 818.18 would be 820)
            timestep=sigma * 1000.0,
            encoder_hidden_states=hidden.to(dev, dtype),
            pooled_projections=pooled.to(dev, dtype),
            return_dict=False,
        )[0].float()
        if self.cfg_scale is not None:
            v_u, v_c = out.chunk(2)
            out = v_u + self.cfg_scale * (v_c - v_u)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae_decode(latents.float())
