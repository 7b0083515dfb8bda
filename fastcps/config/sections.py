"""The sections of the run config that describe what is trained and on what: the policy (and its LoRA),
the sampler, the rewards, the prompts; and what every section shares (``SECTION``, the world size given
to validation). ``fastcps.config.models`` holds the run-level sections and :class:`RunConfig`."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fastcps.config.errors import NESTED_ERRORS
from fastcps.samplers import SAMPLERS

# Every section: unknown keys are errors; attribute docstrings become the schema's descriptions.
SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _world_size(info: ValidationInfo) -> int | None:
    """The number of processes, given to ``validate_tree``; None while a config only loads."""
    return (info.context or {}).get("world_size")


def lora_dropout_error(dropout: float) -> str:
    """Why ``policy.lora.dropout`` must be 0 (the config validator and ``Policy.add_lora`` say it)."""
    return (
        f"policy.lora.dropout = {dropout}: the rollout samples in eval mode, so the log-probs it stores have "
        "no dropout, while the training forward (train mode) would drop LoRA inputs at random: the "
        "importance ratio would differ from 1 at the first step, and the clipped loss would train on "
        "dropout noise. Set policy.lora.dropout to 0 (flow_grpo's LoRA has none either)"
    )


class LoraConfig(BaseModel):
    model_config = SECTION

    r: int = 64
    """LoRA rank (flow_grpo: 64 for FLUX, 32 for SD3.5)."""
    alpha: float = 128.0
    """LoRA scaling numerator (effective scale alpha / r)."""
    target_modules: list[str] = Field(default_factory=list)
    """Module names to adapt; empty = the policy's default (flow_grpo's attention/ff targets)."""
    dropout: float = 0.0
    """LoRA dropout: must be 0 (the rollout samples and stores its log-probs without dropout, so a
    training forward with dropout would start from a ratio other than 1)."""

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, dropout: float) -> float:
        if dropout:
            raise ValueError(lora_dropout_error(dropout))
        return dropout


class PolicyConfig(BaseModel):
    model_config = SECTION

    name: Literal["toy", "flux", "sd3", "qwenimage", "kontext", "qwenimage_edit"] = "toy"
    """Policy adapter: `toy` (16x16 digits, CPU), `flux` (FLUX.1-dev/schnell), `sd3` (SD3.5), `qwenimage`
    (Qwen-Image); editing (prompt rows with a source "image"): `kontext` (FLUX.1 Kontext [dev]),
    `qwenimage_edit` (Qwen-Image-Edit)."""
    pretrained: str = ""
    """Local path or hub id of the weights; empty = the shipped toy base (toy only)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the trained transformer's weights and forward."""
    resolution: int = 16
    """Image side in pixels."""
    guidance: float | None = None
    """Distilled guidance scale fed through FLUX.1's embedding; None = the model's default (FLUX.1-dev 3.5,
    FLUX.1 Kontext 2.5) or none for models without it."""
    cfg_scale: float | None = None
    """True classifier-free guidance scale (SD3.5, Qwen-Image); None = off."""
    lora: LoraConfig | None = None
    """LoRA adapters through peft; None = full fine-tuning."""
    attention_backend: Literal["sdpa", "flash"] = "sdpa"
    """`flash` uses flash-attn through diffusers' attention backend on CUDA when installed."""
    offload_frozen: bool = False
    """Move text encoders to CPU once prompt embeddings are cached."""
    prompt_cache_gib: float = Field(4.0, ge=0)
    """Host memory per rank for cached prompt encodings; past it the least recently used go (and are
    encoded again if they come back); 0 = encode prompts every time. FLUX at 128 T5 tokens: 1 MiB a prompt,
    ~4000 prompts in 4 GiB."""
    max_sequence_length: int = 128
    """T5 tokens per prompt: FLUX attends over them with the image's tokens in every block, so each forward
    costs more with every token (512 px FLUX.1-dev: 1024 image tokens; 512 text tokens make a forward
    ~1.33x of 128's). 128 is what flow_grpo trains FLUX and SD3.5 with (the pipelines' defaults are
    512 / 256). Qwen-Image: Qwen2.5-VL tokens after the chat template's prefix, at most 1024 (FlowCPS: 512,
    the pipeline's default). Prompts with more tokens are cut, as the pipelines do; the trainer reports how
    many at start-up with the length that would keep them whole."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute the transformer's activations in backward (diffusers' gradient checkpointing): one more
    forward per trained step. `auto`: only when the resource plan (fastcps.plan) says the step does not
    fit the GPU's memory without it (on the CPU: off)."""


class SamplerConfig(BaseModel):
    model_config = SECTION

    name: str = "cps"
    """Sampler of fastcps.samplers: cps | flow_sde | dance_sde | ode | cpws | dpmpp1_sde."""
    eta: float | None = None
    """Noise level; None = the sampler's default (cps 0.8, flow_sde 0.7, dance_sde 0.3)."""
    num_steps: int = Field(8, ge=1)
    """Sampling steps of a rollout."""
    logprob: Literal["paper", "gaussian"] | None = None
    """Log-prob form; None = the sampler's own (cps: paper, flow_sde/dance_sde: gaussian)."""
    kl: Literal["paper", "gaussian", "flow_grpo"] | None = None
    """KL form of train.beta_kl·KL, KL = w·mean((μθ − μref)²); None = the sampler's anchor's training code:
    cps `paper` (w = 1, FlowCPS), flow_sde `flow_grpo` (w = 1/(2·std_dev_t²), Flow-GRPO's code, no √Δ),
    dance_sde `gaussian` (w = 1/(2s²), the step Gaussians' KL; DanceGRPO has no KL). See docs/math.md."""
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of the noisy steps that are trained (the first ones, as flow_grpo does)."""
    sde_window_size: int | None = Field(None, ge=1)
    """MixGRPO-style window: only this many consecutive steps are stochastic (ODE elsewhere)."""
    sde_window_range: tuple[int, int] | None = None
    """[lo, hi): the window's first step is drawn per epoch from this range; None = [0, T - size + 1)."""

    @field_validator("name")
    @classmethod
    def _known_sampler(cls, name: str) -> str:
        if name not in SAMPLERS:
            close = difflib.get_close_matches(name, list(SAMPLERS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{name!r} is not a sampler; {hint}choose one of {sorted(SAMPLERS)}")
        return name

    @model_validator(mode="after")
    def _window_fits(self) -> SamplerConfig:
        if self.sde_window_size is not None and self.sde_window_size > self.num_steps:
            raise ValueError(
                f"sampler.sde_window_size must lie in [1, num_steps={self.num_steps}], "
                f"got {self.sde_window_size}"
            )
        return self


class RewardConfig(BaseModel):
    model_config = ConfigDict(**SECTION, json_schema_extra=lambda schema, cls: _reward_args_schema(schema))

    name: str
    """Registered reward (fastcps.rewards.REGISTRY): digit, digit_clean_trained, jpeg_compressibility,
    pickscore, hpsv2, ocr, geneval, aesthetic, remote (any of them served by `python -m
    fastcps.rewards.serve`)."""
    weight: float = 1.0
    """Weight in the summed reward the advantages are computed from."""
    # validate_default: `args` left out is checked too (remote's `url` must be given)
    args: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Constructor arguments of the reward (e.g. a weights path), checked against the reward's `Args`."""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from fastcps.rewards import REGISTRY, unknown_reward_message

        if name not in REGISTRY:
            raise ValueError(unknown_reward_message(name))
        return name

    @field_validator("args")
    @classmethod
    def _typed_args(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the reward's ``Args`` now rather than when the trainer builds the reward, after
        the policy and DeepSpeed loaded. Kept as given: the reward's constructor fills the defaults."""
        from fastcps.rewards import args_model

        name = info.data.get("name")  # absent when the name failed: that error is the one reported
        model = None if name is None else args_model(name)
        if model is not None:
            try:
                model.model_validate(args, strict=True)
            except ValidationError as err:
                raise PydanticCustomError(
                    "reward_args",
                    "bad arguments of reward {reward}: {detail}",
                    {
                        "reward": name,
                        "detail": str(err.errors()[0]["msg"]),
                        NESTED_ERRORS: err.errors(),
                        "config_model": model,
                        "config_note": f"arguments of reward {name!r}",
                    },
                ) from None
        return args


def _reward_args_schema(schema: dict) -> None:
    """Each built-in reward's ``Args`` as JSON Schema ``if name == X then args: Args(X)``: editors
    complete and check a reward's arguments too."""
    from fastcps.rewards import REGISTRY, args_model

    cases = []
    for name, target in REGISTRY.items():
        # built-in ones only: the committed schema must not depend on what else a process registered
        model = args_model(name) if target.startswith("fastcps.rewards.") else None
        if model is not None:
            then = {"properties": {"args": model.model_json_schema(by_alias=True)}}
            cases.append({"if": {"properties": {"name": {"const": name}}}, "then": then})
    schema["allOf"] = cases


class PromptConfig(BaseModel):
    model_config = SECTION

    source: str = "digits"
    """Training prompts: `digits` (the toy's prompts), a named set (`pickscore:train`, `pickscore:test`,
    `ocr:train`, `ocr:test`, `geneval:train`, `geneval:test`, `hpd:train`, `counting_edit:train`,
    `counting_edit:test`: configs/prompts/README.md), or a .txt file (one prompt per line) or .jsonl file
    ({"prompt": ..., "metadata": {...}} per line; an "image", a path relative to the file or a URL, or a
    list of them, makes the row an edit row: the prompt is the instruction, the image what to edit)."""
    eval_source: str | None = None
    """Prompts of the fixed eval set (`eval.num_prompts` of them, spread evenly), given as `source` is;
    keep them out of the training prompts (a held-out test split). None = drawn from `source`: a warning
    at start-up says why that misleads."""

    @field_validator("source", "eval_source")
    @classmethod
    def _known_set(cls, value: str | None) -> str | None:
        """A `family:split` value must name a known set (a typo fails now, with a did-you-mean)."""
        from fastcps import prompt_sets

        if value is not None and prompt_sets.looks_like_name(value) and value not in prompt_sets.SETS:
            raise ValueError(prompt_sets.unknown_set_message(value, key=None))
        return value
