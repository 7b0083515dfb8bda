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

Cond = dict[str, torch.Tensor]  # conditioning tensors, first dim = number of prompts


class Policy(abc.ABC):
    #: the module DeepSpeed wraps and trains (LoRA-wrapped or full)
    transformer: torch.nn.Module

    @abc.abstractmethod
    def encode(self, prompts: list[str]) -> Cond:
        """Conditioning for each prompt (no grad). The trainer caches it per prompt."""

    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape, e.g. (L, 64) for packed FLUX tokens."""

    @abc.abstractmethod
    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        """(num_steps + 1,) fp32 schedule from 1 toward 0, with the trailing 0 appended."""

    @abc.abstractmethod
    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v = model(latents, σ, cond), same shape as latents. ``model`` is ``self.transformer`` or its
        DeepSpeed engine; ``sigma`` is (B,) fp32."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], fp32, no grad."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Yields the module that predicts the reference policy's velocity (the frozen base):
        a frozen copy, or ``model`` with its LoRA adapters disabled."""
        raise NotImplementedError(f"{type(self).__name__} has no reference policy")
        yield  # pragma: no cover

    def initial_noise(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """x1 ~ N(0, I) in fp32, shape (batch, *latent_shape)."""
        return torch.randn((batch, *self.latent_shape()), generator=generator, dtype=torch.float32,
                           device=device or "cpu")
