"""Rewards: ``Reward(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]``, batched, no grad.

Registered by name and built lazily from the config (heavy models load on first call, on the
images' device, outside DeepSpeed's ZeRO-3 partitioning since they never enter ``deepspeed.initialize``).
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

import torch

# name -> "module:Class"; imported only when used so a FLUX user needs no toy and vice versa.
REGISTRY: dict[str, str] = {
    "digit": "fastcps.rewards.digit:DigitReward",
    "jpeg_compressibility": "fastcps.rewards.jpeg:JpegCompressibility",
    "pickscore": "fastcps.rewards.pickscore:PickScoreReward",
    "hpsv2": "fastcps.rewards.hpsv2:HPSv2Reward",
    "ocr": "fastcps.rewards.ocr:OcrReward",
    "geneval": "fastcps.rewards.geneval:GenEvalReward",
    "aesthetic": "fastcps.rewards.aesthetic:AestheticReward",
}


def register(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (for rewards living outside fastcps)."""
    REGISTRY[name] = target


def build_reward(name: str, args: dict | None = None) -> Callable:
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r} in config key `rewards`; choose one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**(args or {}))
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad `args` in the config ({err})") from err


class RewardOutput(NamedTuple):
    total: torch.Tensor  # (B,) weighted sum
    components: dict[str, torch.Tensor]  # name -> (B,) unweighted


class RewardFailed(RuntimeError):
    """A reward raised: the run stops and says which reward and why."""


class WeightedReward:
    """Sum of weighted rewards; each component is reported by name."""

    def __init__(self, specs: list[tuple[str, float, dict]]):
        self.parts = [(name, float(weight), build_reward(name, args)) for name, weight, args in specs]
        names = [n for n, _, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"config key `rewards` names a reward twice: {names}")

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        comps, total = {}, None
        for name, weight, fn in self.parts:
            try:
                with torch.no_grad():
                    r = fn(images, prompts, metadata)
            except Exception as err:
                raise RewardFailed(f"reward {name!r} raised {type(err).__name__}: {err}") from err
            r = torch.as_tensor(r, dtype=torch.float32).reshape(-1).cpu()
            if r.shape[0] != images.shape[0]:
                raise RewardFailed(f"reward {name!r} returned {r.shape[0]} values for {images.shape[0]} images")
            if not bool(torch.isfinite(r).all()):
                bad = [prompts[i] for i in torch.nonzero(~torch.isfinite(r)).flatten().tolist()[:3]]
                raise RewardFailed(f"reward {name!r} returned non-finite values (e.g. for prompts {bad})")
            comps[name] = r
            total = weight * r if total is None else total + weight * r
        return RewardOutput(total, comps)
