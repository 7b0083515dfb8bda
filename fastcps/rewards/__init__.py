"""Rewards: ``Reward(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]``, batched, no grad.

Images are float tensors in [0, 1]. The FLUX/SD3 policies decode them in fp32 and hand them quantised to
the 8-bit levels k/255 a saved image holds; the image-model rewards (pickscore, hpsv2, aesthetic, ocr,
geneval, jpeg_compressibility) score those levels as uint8 (``_util.to_uint8``: ``(images * 255).round()
.clamp(0, 255)``, exact on k/255), preprocessed as their anchors' code does (tests/test_reward_anchors.py
compares each with flow_grpo's, transcribed). The toy's ``digit`` reward reads its images as they are.

Registered by name and built from the config. Heavy models load on the first call, on the images' device
(or ``reward.load(device)`` loads them now: the trainer does, before its first collective), outside
DeepSpeed's ZeRO-3 partitioning since they never enter ``deepspeed.initialize``. ``RewardClass.files(args)``
declares what a reward needs on disk (``python -m fastcps.fetch``), ``RewardClass.preflight(args)`` what
else the trainer checks at start-up (``check_services``: a reward service answering), and
``RewardClass.component_name(args)`` the name its score is logged under when that is not the reward's name
(several ``remote`` rewards in one run).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict

# name -> "module:Class"; imported only when used so a FLUX user needs no toy and vice versa.
REGISTRY: dict[str, str] = {
    "digit": "fastcps.rewards.digit:DigitReward",
    "digit_clean_trained": "fastcps.rewards.digit:DigitCleanTrainedReward",
    "jpeg_compressibility": "fastcps.rewards.jpeg:JpegCompressibility",
    "pickscore": "fastcps.rewards.pickscore:PickScoreReward",
    "hpsv2": "fastcps.rewards.hpsv2:HPSv2Reward",
    "ocr": "fastcps.rewards.ocr:OcrReward",
    "geneval": "fastcps.rewards.geneval:GenEvalReward",
    "aesthetic": "fastcps.rewards.aesthetic:AestheticReward",
    "image_similarity": "fastcps.rewards.image_similarity:ImageSimilarityReward",
    "vlm_judge": "fastcps.rewards.vlm_judge:VlmJudgeReward",
    "remote": "fastcps.rewards.remote:RemoteReward",
}


# name -> (target, args model) of rewards registered with an args model (see ``register``).
_EXTERNAL_ARGS: dict[str, tuple[str, type[BaseModel]]] = {}

DType = Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "amp"] | None
"""The precisions ``fastcps.rewards._util.resolve_dtype`` knows (None = float32)."""


class RewardArgs(BaseModel):
    """Base of a reward's typed ``Args`` (config ``rewards[].args``): unknown keys are errors.

    A reward class declares ``Args`` (a subclass, one field per constructor argument, same defaults) so
    that the config is checked when it loads, before any model or process group starts. Keep these
    models free of heavy imports: the config imports the reward's module to find them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())


def register(name: str, target: str, args: type[BaseModel] | None = None) -> None:
    """Register ``"module:Class"`` under ``name`` (for rewards living outside fastcps).

    ``args``: the reward's typed arguments, checked with the config; None = any dict is passed on
    unchecked (the module is not imported to look for one: an external reward's import may be heavy)."""
    REGISTRY[name] = target
    if args is None:
        _EXTERNAL_ARGS.pop(name, None)
    else:
        _EXTERNAL_ARGS[name] = (target, args)


def args_model(name: str) -> type[BaseModel] | None:
    """The typed arguments of registered reward ``name``: its class's ``Args``, or None (unchecked)."""
    target = REGISTRY[name]
    external = _EXTERNAL_ARGS.get(name)
    if external is not None and external[0] == target:
        return external[1]
    if not target.startswith("fastcps.rewards."):
        return None
    module, cls = target.split(":")
    return getattr(getattr(importlib.import_module(module), cls), "Args", None)


def unknown_reward_message(name: object) -> str:
    """``unknown reward 'digt'; did you mean 'digit'? Registered rewards: ...``"""
    msg = f"unknown reward {name!r}"
    close = difflib.get_close_matches(str(name), list(REGISTRY), n=1, cutoff=0.6)
    msg += f"; did you mean {close[0]!r}?" if close else "."
    return f"{msg} Registered rewards: {', '.join(sorted(REGISTRY))}"


def _reward_class(name: str):
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def component_name(name: str, args: dict | None = None) -> str:
    """The name reward ``name``'s score is logged under (``reward/<it>/mean``): its class's
    ``component_name(args)`` where it has one (``remote``: ``args.name``), else ``name``. Only fastcps's own
    rewards are asked: an external reward's module is not imported for this."""
    target = REGISTRY.get(name)
    if target is None or not target.startswith("fastcps.rewards."):
        return name
    named = getattr(_reward_class(name), "component_name", None)
    return name if named is None else str(named(dict(args or {})))


def check_services(specs: list[tuple[str, dict]]) -> None:
    """The trainer's start-up check of what rewards need besides files, before any model loads: each
    reward class's ``preflight(args)`` (``remote``: its service answers and is ready). RewardFailed naming
    the reward otherwise (the trainer exits 3)."""
    for name, args in specs:
        preflight = getattr(_reward_class(name), "preflight", None)
        if preflight is None:
            continue
        try:
            preflight(dict(args or {}))
        except Exception as err:
            label = component_name(name, args)
            raise RewardFailed(f"reward {label!r} is not available: {type(err).__name__}: {err}") from err


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
        self.parts = [
            (component_name(name, args), float(weight), build_reward(name, args))
            for name, weight, args in specs
        ]
        names = [n for n, _, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"config key `rewards` names a reward twice: {names}")

    @property
    def weights(self) -> dict[str, float]:
        """Component name -> weight."""
        return {name: weight for name, weight, _ in self.parts}

    def load(self, device) -> None:
        """Load every reward's models now (each reward's ``load(device)``; one without it stays lazy), so a
        trainer loads them before its first collective instead of inside its first eval. A missing file
        stays a FileNotFoundError; any other failure is a RewardFailed naming the reward."""
        for name, _, fn in self.parts:
            load = getattr(fn, "load", None)
            if load is None:
                continue
            try:
                load(torch.device(device))
            except FileNotFoundError:
                raise
            except Exception as err:
                raise RewardFailed(f"reward {name!r} could not load: {type(err).__name__}: {err}") from err

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
                raise RewardFailed(
                    f"reward {name!r} returned {r.shape[0]} values for {images.shape[0]} images"
                )
            if not bool(torch.isfinite(r).all()):
                bad = [prompts[i] for i in torch.nonzero(~torch.isfinite(r)).flatten().tolist()[:3]]
                raise RewardFailed(f"reward {name!r} returned non-finite values (e.g. for prompts {bad})")
            comps[name] = r
            total = weight * r if total is None else total + weight * r
        return RewardOutput(total, comps)
