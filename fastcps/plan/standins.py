"""The stand-ins the counted epoch (``fastcps.plan.epoch``) runs the trainer's functions on: an engine
that records every transformer call, backward and optimizer step, a policy at the real latent shape and
schedule whose velocity is zeros, a constant reward.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from types import SimpleNamespace

import torch


class CountingEngine:
    """Stands in for the DeepSpeed engine around the transformer: records every transformer call
    (phase, "train"/"nograd", samples), every backward (samples) and every optimizer step; the
    collectives follow from these per ZeRO stage (``zero_traffic``)."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.zeros(()))  # gives the training forward a graph
        self.phase = "rollout"
        self.calls: Counter = Counter()  # (phase, kind, samples) -> calls
        self.optimizer_steps = 0
        self._pending: list[int] = []  # samples of the training forwards since the last backward
        self._boundary = False
        self.whole: Counter = Counter()  # phase -> whole-model gathers (rollout.whole_model)
        self.whole_calls: Counter = Counter()  # the calls made while the whole model was gathered
        self._whole = False

    @contextlib.contextmanager
    def whole_model(self):
        """``rollout.whole_model`` on this stand-in: one whole-model gather, then calls that fetch nothing."""
        self.whole[self.phase] += 1
        self._whole = True
        try:
            yield
        finally:
            self._whole = False

    # the transformer call, made by CountingPolicy.velocity
    def forward(self, x: torch.Tensor, samples: int, reference: bool = False) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        phase = self.phase
        if phase == "update":
            phase = (
                "KL reference forward"
                if reference
                else ("training forward" if grad else "old log-prob recompute")
            )
        self.calls[(phase, "train" if grad else "nograd", samples)] += 1
        if self._whole:
            self.whole_calls[(phase, "train" if grad else "nograd", samples)] += 1
        if grad:
            self._pending.append(samples)
            return x * 0 + self.weight
        return torch.zeros_like(x)

    # the DeepSpeed engine interface run_update uses
    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self._boundary = boundary

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        for samples in self._pending:
            self.calls[("training backward", "backward", samples)] += 1
        self._pending = []

    def step(self) -> None:
        self.weight.grad = None
        self.optimizer_steps += self._boundary

    def was_step_applied(self) -> bool:
        return True


class CountingPolicy:
    """The policy interface the epoch functions call, at the real policy's latent shape and schedule;
    every transformer call goes to the engine with its samples (x CFG's 2 where SD3 runs CFG)."""

    def __init__(self, latent_shape: tuple, sigmas, cfg_mult: int, vae_counter: Counter, engine=None):
        self._shape, self._sigmas, self._mult, self._vae = tuple(latent_shape), sigmas, cfg_mult, vae_counter
        self.lora = None
        self.engine = engine
        # (phase, whole model gathered?) -> prompts encoded: the text encoders' phase and what sits
        # beside them on the device (fastcps.plan.costs: "prompt encoding")
        self.encodes: Counter = Counter()

    def latent_shape(self):
        return self._shape

    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        return torch.as_tensor(self._sigmas(num_steps), dtype=torch.float32)

    def encode(self, prompts: list[str], metadata=None):
        if self.engine is not None:
            self.encodes[(self.engine.phase, self.engine._whole)] += len(prompts)
        return {"prompt": torch.zeros(len(prompts), 1)}

    def velocity(self, model, latents: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        return model.forward(
            latents, latents.shape[0] * self._mult, reference=getattr(model, "is_reference", False)
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._vae[latents.shape[0]] += 1
        return torch.zeros(latents.shape[0], 3, 1, 1)

    @contextlib.contextmanager
    def reference(self, model):
        yield SimpleNamespace(
            forward=lambda x, samples, reference=True: model.forward(x, samples, reference=True),
            is_reference=True,
        )


class ConstantReward:
    parts = [("constant", 1.0, None)]

    def __call__(self, images, prompts, metadata):
        from fastcps.rewards import RewardOutput

        r = torch.ones(len(prompts))
        return RewardOutput(r, {"constant": r})


class _Optimizer:
    skip_flag = None
    last_skipped = False
