"""The typed run configuration. JSON files in configs/ load strictly into these dataclasses
(``fastcps.configlib``): an unknown key or a wrong type fails before any model loads, naming the key.

Nothing here depends on the number of processes: per-rank sizes are checked against the world size
at run time (``RunConfig.validate``), and DeepSpeed's batch numbers are computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fastcps.samplers import SAMPLERS


@dataclass
class LoraConfig:
    r: int = 64
    """LoRA rank (flow_grpo: 64 for FLUX, 32 for SD3.5)."""
    alpha: float = 128.0
    """LoRA scaling numerator (effective scale alpha / r)."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty = the policy's default (flow_grpo's attention/ff targets)."""
    dropout: float = 0.0
    """LoRA dropout."""


@dataclass
class PolicyConfig:
    name: Literal["toy", "flux", "sd3"] = "toy"
    """Policy adapter: `toy` (16x16 digits, CPU), `flux` (FLUX.1-dev/schnell), `sd3` (SD3.5)."""
    pretrained: str = ""
    """Local path or hub id of the weights; empty = the shipped toy base (toy only)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the trained transformer's weights and forward."""
    resolution: int = 16
    """Image side in pixels."""
    guidance: float | None = None
    """Distilled guidance scale fed through FLUX.1-dev's embedding (3.5); None for models without it."""
    cfg_scale: float | None = None
    """True classifier-free guidance scale (SD3.5); None = off."""
    lora: LoraConfig | None = None
    """LoRA adapters through peft; None = full fine-tuning."""
    attention_backend: Literal["sdpa", "flash"] = "sdpa"
    """`flash` uses flash-attn through diffusers' attention backend on CUDA when installed."""
    offload_frozen: bool = False
    """Move text encoders to CPU once prompt embeddings are cached."""
    prompt_cache_gib: float = 4.0
    """Host memory per rank for cached prompt encodings; past it the least recently used go (and are
    encoded again if they come back). FLUX at 128 T5 tokens: 1 MiB a prompt, ~4000 prompts in 4 GiB."""
    max_sequence_length: int = 128
    """T5 tokens per prompt: FLUX attends over them with the image's tokens in every block, so each forward
    costs more with every token (512 px FLUX.1-dev: 1024 image tokens; 512 text tokens make a forward
    ~1.33x of 128's). 128 is what flow_grpo trains FLUX and SD3.5 with (the pipelines' defaults are
    512 / 256). Prompts with more tokens are cut, as the pipelines do; the trainer reports how many at
    start-up with the length that would keep them whole."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute the transformer's activations in backward (diffusers' gradient checkpointing): one more
    forward per trained step. `auto`: only when the resource plan (fastcps.plan) says the step does not
    fit the GPU's memory without it (on the CPU: off)."""


@dataclass
class SamplerConfig:
    name: str = "cps"
    """Sampler of fastcps.samplers: cps | flow_sde | dance_sde | ode | cpws | dpmpp1_sde."""
    eta: float | None = None
    """Noise level; None = the sampler's default (cps 0.8, flow_sde 0.7, dance_sde 0.3)."""
    num_steps: int = 8
    """Sampling steps of a rollout."""
    logprob: Literal["paper", "gaussian"] | None = None
    """Log-prob form; None = the sampler's own (cps: paper, flow_sde/dance_sde: gaussian)."""
    kl: Literal["paper", "gaussian", "flow_grpo"] | None = None
    """KL form of train.beta_kl·KL, KL = w·mean((μθ − μref)²); None = the sampler's anchor's training code:
    cps `paper` (w = 1, FlowCPS), flow_sde `flow_grpo` (w = 1/(2·std_dev_t²), Flow-GRPO's code, no √Δ),
    dance_sde `gaussian` (w = 1/(2s²), the step Gaussians' KL; DanceGRPO has no KL). See docs/math.md."""
    timestep_fraction: float = 1.0
    """Fraction of the noisy steps that are trained (the first ones, as flow_grpo does)."""
    sde_window_size: int | None = None
    """MixGRPO-style window: only this many consecutive steps are stochastic (ODE elsewhere)."""
    sde_window_range: tuple[int, int] | None = None
    """[lo, hi): the window's first step is drawn per epoch from this range; None = [0, T - size + 1)."""

    def validate(self, world_size: int | None = None) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler.name {self.name!r} is not a sampler; choose one of {sorted(SAMPLERS)}")
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"sampler.timestep_fraction must lie in (0, 1], got {self.timestep_fraction}")
        if self.sde_window_size is not None and not 1 <= self.sde_window_size <= self.num_steps:
            raise ValueError(f"sampler.sde_window_size must lie in [1, num_steps={self.num_steps}], "
                             f"got {self.sde_window_size}")


@dataclass
class RewardConfig:
    name: str
    """Registered reward: digit, jpeg_compressibility, pickscore, hpsv2, ocr, geneval, aesthetic."""
    weight: float = 1.0
    """Weight in the summed reward the advantages are computed from."""
    args: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the reward (e.g. a weights path)."""


@dataclass
class PromptConfig:
    source: str = "digits"
    """`digits` (the toy's prompts), or a .txt file (one prompt per line) or .jsonl file
    ({"prompt": ..., "metadata": {...}} per line)."""
    eval_source: str | None = None
    """Prompts of the fixed eval set; None = the first `eval.num_prompts` of `source`."""


@dataclass
class TrainConfig:
    num_epochs: int = 40
    """Epochs; one epoch = one rollout of `prompts_per_epoch` x `images_per_prompt` images + updates."""
    prompts_per_epoch: int = 8
    """Distinct prompts per epoch, over all ranks (a group may span ranks)."""
    images_per_prompt: int = 8
    """K: images per prompt, the GRPO group size."""
    rollout_batch_size: int = 16
    """Images per rollout forward, per rank."""
    minibatch_size: int = 16
    """Images per training forward, per rank (DeepSpeed's micro batch)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step; every trained timestep of a minibatch accumulates too."""
    num_inner_epochs: int = 1
    """Passes over one epoch's samples."""
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping (DeepSpeed gradient_clipping)."""
    clip_range: float = 1e-4
    """PPO ratio clip. CPS's log-prob is not divided by the noise variance, so its ratios move by
    ~1e-4 per update: flow_grpo uses 1e-5 for CPS and 2e-4 for Flow-SDE."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to +-adv_clip_max."""
    adv_std: Literal["prompt", "global"] = "prompt"
    """Normalise advantages by the group's std or by the std of all rewards."""
    zero_std_threshold: float = 1e-6
    """A group whose reward std is below this gets zero advantage."""
    beta_kl: float = 0.0
    """Weight of the KL to the reference policy (the frozen base)."""
    old_logprob: Literal["rollout", "recompute"] = "recompute"
    """Old log-probs from the rollout, or from the training forward (ratio exactly 1 before the first
    optimizer step): the first window's micro-steps use their own forward's; later windows' samples use
    the rollout's when those equal the training forward's bit for bit (minibatch_size ==
    rollout_batch_size, checked on the first window every epoch), else get one no-grad forward before
    the first step (fastcps.update.run_update)."""
    ema_decay: float | None = None
    """EMA of the trained weights, used for eval; None = off."""
    max_nonfinite_steps: int = 3
    """Stop after this many optimizer steps in a row skipped for a non-finite loss or gradient."""

    def validate(self, world_size: int | None = None) -> None:
        for key in ("num_epochs", "prompts_per_epoch", "images_per_prompt", "rollout_batch_size",
                    "minibatch_size", "gradient_accumulation_steps", "num_inner_epochs", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.images_per_prompt < 2:
            raise ValueError("train.images_per_prompt must be >= 2: GRPO compares images within a group")
        if self.clip_range <= 0:
            raise ValueError(f"train.clip_range must be > 0, got {self.clip_range}")
        if world_size is None:
            return
        total = self.prompts_per_epoch * self.images_per_prompt
        if total % world_size:
            raise ValueError(f"train.prompts_per_epoch x train.images_per_prompt = {total} images per epoch "
                             f"does not split over {world_size} processes")
        per_rank = total // world_size
        if per_rank % self.rollout_batch_size:
            raise ValueError(f"train.rollout_batch_size = {self.rollout_batch_size} does not divide the "
                             f"{per_rank} images per process ({total} over {world_size} processes)")
        if per_rank % self.minibatch_size:
            raise ValueError(f"train.minibatch_size = {self.minibatch_size} does not divide the {per_rank} "
                             f"images per process ({total} over {world_size} processes)")
        if (per_rank // self.minibatch_size) % self.gradient_accumulation_steps:
            raise ValueError(f"train.gradient_accumulation_steps = {self.gradient_accumulation_steps} does "
                             f"not divide the {per_rank // self.minibatch_size} minibatches per process")


@dataclass
class EvalConfig:
    every: int = 5
    """Evaluate every this many epochs (and before the first and after the last); 0 = never."""
    num_prompts: int = 10
    """Prompts in the fixed eval set."""
    images_per_prompt: int = 4
    """Images per eval prompt (their spread is eval/diversity)."""
    num_steps: int | None = None
    """ODE steps for eval; None = sampler.num_steps."""
    seed: int = 1234
    """Seed of the eval set's initial noises."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """TensorBoard scalars and images in <run>/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    images_every: int = 5
    """Write rollout and eval image grids every this many epochs; 0 = never."""
    progress: bool = True
    """Progress of rollout and update on rank 0: tqdm bars on a terminal, one plain line per phase otherwise."""


@dataclass
class CheckpointConfig:
    every: int = 10
    """Save a checkpoint every this many epochs (and at the end); 0 = only at the end."""
    keep: int = 2
    """Periodic checkpoints kept (the newest); the final one is always kept."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Seeds every random choice: prompts, noises, shuffles."""
    deepspeed_config: str = "configs/ds_zero3.json"
    """DeepSpeed JSON (ZeRO stage etc.); batch sizes in it are filled in at run time."""
    zero_stage: Literal["auto", 2, 3] | None = None
    """ZeRO stage, overriding the DeepSpeed JSON's: `auto` takes ZeRO-2 (whole weights on every GPU, no
    parameter gathers) when the resource plan says it fits the GPU's memory and ZeRO-3 when it does not
    (on the CPU: the JSON's stage); None = the JSON's."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig("digit")])
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, world_size: int | None = None) -> None:
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        if self.eval.every < 0 or self.checkpoint.every < 0:
            raise ValueError("eval.every and checkpoint.every must be >= 0")
        if self.policy.prompt_cache_gib < 0:
            raise ValueError(f"policy.prompt_cache_gib must be >= 0 (0: encode prompts every time), "
                             f"got {self.policy.prompt_cache_gib}")
