"""The one interface the trainer sees. Only policies touch diffusers internals.

A policy owns the models of one family (FLUX, SD3, the toy) and answers six questions: how prompts
become conditioning, what the velocity is, how latents become images, which sigmas a schedule has,
which parameters train, and what the reference policy predicts.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterator

import torch

from fastcps.conditioning import Cond, expand_cond
from fastcps.policies.families import FLUX_LORA_TARGETS


class Policy(abc.ABC):
    #: the module DeepSpeed wraps and trains (LoRA-wrapped or full)
    transformer: torch.nn.Module

    #: an editing policy conditions on each prompt's source image(s) (``metadata[i]["source_images"]``,
    #: ``fastcps.edit_images``) as well as its instruction; a text-to-image policy reads the text only
    editing: bool = False

    @abc.abstractmethod
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        """Conditioning for each prompt (no grad). The trainer caches it per ``encoding_key``. ``metadata``
        (one dict per prompt: the prompt rows' metadata) is what an editing policy reads its source images
        from; a text-to-image policy ignores it."""

    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape, e.g. (L, 64) for packed FLUX tokens."""

    @abc.abstractmethod
    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        """(num_steps + 1,) fp32 schedule from 1 toward 0, with the trailing 0 appended."""

    @abc.abstractmethod
    def velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        """v = model(latents, σ, cond), same shape as latents. ``model`` is ``self.transformer`` or its
        DeepSpeed engine; ``sigma`` is (B,) fp32."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], fp32, no grad. The FLUX/SD3 policies return exactly the 8-bit
        levels k/255 of a saved image (what the anchors' rewards score); the toy returns its decode as is."""

    #: module names LoRA adapts by default: the family's (``fastcps.policies.families``)
    default_lora_targets: tuple[str, ...] = FLUX_LORA_TARGETS
    lora: bool = False
    #: True when the transformer was left on the CPU for ZeRO-3 (its buffers on the device): the trainer
    #: partitions it onto the device tensor by tensor (``fastcps.engine.partition_zero3``), so no rank
    #: ever holds the whole model there
    deferred_placement: bool = False

    def add_lora(self, r: int, alpha: float, target_modules=(), dropout: float = 0.0) -> None:
        """Freeze the transformer and add peft LoRA adapters (B = 0 at start: the policy is the base). A is
        drawn from N(0, 1/r²) (peft's ``init_lora_weights="gaussian"``), as the anchors initialise it for
        every model (FlowCPS and flow_grpo, scripts/train_*.py), not peft's default Kaiming-uniform A: the
        first updates of B scale with A, so the init is part of the recipe."""
        from peft import LoraConfig

        from fastcps.config.sections import lora_dropout_error

        if dropout:
            raise ValueError(lora_dropout_error(dropout))

        targets = list(target_modules) or list(self.default_lora_targets)
        names = [n for n, _ in self.transformer.named_modules()]
        # peft's rule: a target names a module whose path is the target or ends with "." + target
        present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
        if not present:
            raise ValueError(
                f"policy.lora.target_modules {targets} match no module of {type(self.transformer).__name__}"
            )
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(
            LoraConfig(
                r=r,
                lora_alpha=alpha,
                lora_dropout=dropout,
                init_lora_weights="gaussian",
                target_modules=present,
            )
        )
        self.lora = True

    @staticmethod
    def batch_inputs(
        latents: torch.Tensor, sigma, cond: Cond
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ, per-token text states, pooled text vector) of the FLUX/SD3/toy bundle, each broadcast to the
        latents' batch: a float or one σ serves every sample, one prompt's conditioning serves every
        sample (``fastcps.conditioning.expand_cond``)."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(b)
        if sigma.shape[0] != b:
            raise ValueError(f"batch mismatch: latents {b}, sigma {sigma.shape[0]}")
        cond = expand_cond(cond, b)
        return sigma, cond["encoder_hidden_states"], cond["pooled_projections"]

    def encoding_key(self, prompt: str, meta: dict | None = None):
        """What the prompt cache keys an encoding on: what the encoder reads (the prompt; an editing
        policy's instruction with its source images: ``fastcps.prompts.prompt_identity``)."""
        if self.editing:
            from fastcps.prompts import prompt_identity

            return prompt_identity(prompt, meta)
        return prompt

    def text_token_counts(self, prompts: list[str]) -> list[int] | None:
        """Tokens each prompt has for the length-limited text encoder (``policy.max_sequence_length``),
        before any truncation; None when the policy has no such limit (the toy)."""
        return None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Yields the module that predicts the reference policy's velocity (the frozen base):
        ``model`` with its LoRA adapters disabled, or (in subclasses) a frozen copy."""
        if not self.lora:
            raise NotImplementedError(f"{type(self).__name__} without LoRA has no reference policy")
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the transformer
        module.disable_adapters()
        try:
            yield model
        finally:
            module.enable_adapters()

    def initial_noise(
        self, batch: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """x1 ~ N(0, I) in fp32, shape (batch, *latent_shape)."""
        return torch.randn(
            (batch, *self.latent_shape()), generator=generator, dtype=torch.float32, device=device or "cpu"
        )
