"""The typed run configuration. JSON files in configs/ load strictly into these pydantic models
(``fastcps.config.loading``): an unknown key, a wrong type, a value out of range, an unknown reward or a bad
reward argument fails before any model loads, naming the key.

Nothing here depends on the number of processes: per-rank sizes are checked against the world size
at run time (``validate_tree(cfg, world_size)`` validates again with ``{"world_size": n}`` as pydantic's
validation context), and DeepSpeed's batch numbers are computed from them.

``python -m fastcps.config --schema [--out FILE]`` prints the JSON Schema of :class:`RunConfig` (field
descriptions are the attribute docstrings below); ``configs/schema.json`` is its committed copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fastcps.config.errors import SCHEMA_KEY
from fastcps.config.sections import (
    SECTION,
    PolicyConfig,
    PromptConfig,
    RewardConfig,
    SamplerConfig,
    _world_size,
)


class TrainConfig(BaseModel):
    model_config = SECTION

    num_epochs: int = Field(40, ge=1)
    """Epochs; one epoch = one rollout of `prompts_per_epoch` x `images_per_prompt` images + updates."""
    prompts_per_epoch: int = Field(8, ge=1)
    """Distinct prompts per epoch, over all ranks (a group may span ranks)."""
    images_per_prompt: int = Field(8, ge=2)
    """K: images per prompt, the GRPO group size (>= 2: GRPO compares images within a group)."""
    rollout_batch_size: int = Field(16, ge=1)
    """Images per rollout forward, per rank."""
    minibatch_size: int = Field(16, ge=1)
    """Images per training forward, per rank (DeepSpeed's micro batch)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Minibatches per optimizer step; every trained timestep of a minibatch accumulates too."""
    micro_batch: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    """Images per transformer call, rollout and training alike, per rank: sets `rollout_batch_size` and
    `minibatch_size` to it and `gradient_accumulation_steps` to `minibatch_size` x
    `gradient_accumulation_steps` / micro_batch, so the images per optimizer step stay as written (8 x 3
    -> 4 x 6) and the rollout's log-probs stay reusable for later accumulation windows (`old_logprob`).
    Must divide `minibatch_size` x `gradient_accumulation_steps`. `auto`: the largest such batch that
    the resource plan's choice fits in the GPU's memory (fastcps.plan; on the CPU: `minibatch_size`);
    None = the sizes as written."""
    num_inner_epochs: int = Field(1, ge=1)
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
    clip_range: float = Field(1e-4, gt=0.0)
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
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop after this many optimizer steps in a row skipped for a non-finite loss or gradient."""

    @model_validator(mode="after")
    def _splits_over_processes(self, info: ValidationInfo) -> TrainConfig:
        """Only in ``validate_tree(cfg, world_size)``: each process gets whole batches."""
        world_size = _world_size(info)
        if world_size is not None:
            self._check_split(world_size)
        return self

    def _check_split(self, world_size: int) -> None:
        total = self.prompts_per_epoch * self.images_per_prompt
        if total % world_size:
            raise ValueError(
                f"train.prompts_per_epoch x train.images_per_prompt = {total} images per epoch "
                f"does not split over {world_size} processes"
            )
        per_rank = total // world_size
        if per_rank % self.rollout_batch_size:
            raise ValueError(
                f"train.rollout_batch_size = {self.rollout_batch_size} does not divide the "
                f"{per_rank} images per process ({total} over {world_size} processes)"
            )
        if per_rank % self.minibatch_size:
            raise ValueError(
                f"train.minibatch_size = {self.minibatch_size} does not divide the {per_rank} "
                f"images per process ({total} over {world_size} processes)"
            )
        if (per_rank // self.minibatch_size) % self.gradient_accumulation_steps:
            raise ValueError(
                f"train.gradient_accumulation_steps = {self.gradient_accumulation_steps} does "
                f"not divide the {per_rank // self.minibatch_size} minibatches per process"
            )
        step = self.minibatch_size * self.gradient_accumulation_steps
        if isinstance(self.micro_batch, int) and step % self.micro_batch:
            raise ValueError(
                f"train.micro_batch = {self.micro_batch} does not divide the {step} images per optimizer "
                f"step (train.minibatch_size x train.gradient_accumulation_steps); choose one of "
                f'{[b for b in range(1, step + 1) if step % b == 0]}, or "auto"'
            )


class EvalConfig(BaseModel):
    model_config = SECTION

    every: int = Field(5, ge=0)
    """Evaluate every this many epochs (and before the first and after the last); 0 = never."""
    num_prompts: int = 10
    """Prompts in the fixed eval set."""
    images_per_prompt: int = 4
    """Images per eval prompt (their spread is eval/diversity)."""
    num_steps: int | None = None
    """ODE steps for eval; None = sampler.num_steps."""
    seed: int = 1234
    """Seed of the eval set's initial noises."""


class LogConfig(BaseModel):
    model_config = SECTION

    tensorboard: bool = True
    """TensorBoard scalars and images in <run>/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    images_every: int = 5
    """Write rollout and eval image grids every this many epochs; 0 = never."""
    progress: bool = True
    """Progress of rollout and update on rank 0: tqdm bars on a terminal, one plain line per phase
    otherwise."""


class CheckpointConfig(BaseModel):
    model_config = SECTION

    every: int = Field(10, ge=0)
    """Save a checkpoint every this many epochs (and at the end); 0 = only at the end."""
    keep: int = 2
    """Periodic checkpoints kept (the newest); the final one is always kept."""


class DistributedConfig(BaseModel):
    model_config = SECTION

    load_timeout_s: float = Field(1800.0, gt=0)
    """Seconds a collective may wait while the run loads: the process group's start (every rank must
    join), model and weight loading (a first download included), DeepSpeed's engine, the first epoch
    after a start or resume (the base model's eval, the first compiles of the fused ops) and every
    checkpoint save (rank 0 writes while the others wait). Ranks legitimately wait for the slowest one
    there: 30 min, torch's default for gloo (NCCL's is 10 min, DeepSpeed's too, too short for a 24 GB
    download)."""
    step_timeout_s: float = Field(300.0, gt=0)
    """Seconds a collective may wait in the training loop (after the first epoch): a rank stuck or
    gone for longer ends the run (exit 6) instead of hanging it. Ranks meet at collectives many times
    per epoch and do the same work in between, so they wait on each other for seconds (rank 0's image
    grids, an uneven reward batch); 5 min leaves a wide margin above that and frees a stuck job's
    GPUs 6x sooner than torch's 30 min default."""
    heartbeat_timeout_s: float = Field(60.0, ge=2)
    """Seconds without a heartbeat after which a rank is taken for dead (SIGKILL, the OOM killer, a
    lost node) and every rank ends (exit 5, naming it). The heartbeat is written every second by a
    thread that does nothing else, so only a dead process (or one whose interpreter is frozen for this
    long) misses it; 60 s is far above any scheduling hiccup yet ends a broken job within a minute.
    Also bounds how long a failing rank waits for the others to read its error."""


class MemoryReserveConfig(BaseModel):
    model_config = SECTION

    fraction: float = Field(0.08, ge=0.0, lt=1.0)
    """Share of the GPU's total memory (as torch reports it) that `zero_stage`, `gradient_checkpointing`,
    `whole_model_sampling` and `train.micro_batch` = `auto` keep free of the resource plan's peak: the
    plan counts tensors, not the CUDA context, cuBLAS and NCCL workspaces or the caching allocator's
    fragmentation (fastcps.plan.choose lists the sources). 0.08 of an 80 GB H100 (79.1 GiB) is 6.3 GiB."""
    gib: float = Field(0.0, ge=0.0)
    """A floor in GiB: the reserve is the larger of `fraction` x total memory and this."""


class RunConfig(BaseModel):
    """A fastcps training run (``python -m fastcps.train --config FILE``)."""

    model_config = ConfigDict(**SECTION, json_schema_extra=lambda schema, cls: _allow_schema_key(schema))

    name: str = "run"
    """Run name; the run directory is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Seeds every random choice: prompts, noises, shuffles."""
    deepspeed_config: str = "configs/ds_zero3.json"
    """DeepSpeed JSON (ZeRO stage etc.); batch sizes in it are filled in at run time."""
    whole_model_sampling: bool | Literal["auto"] = "auto"
    """Under ZeRO-3, gather the whole transformer once for each sampling phase (the rollout, the eval)
    with DeepSpeed's `unwrap_model_for_generation`, instead of gathering each module at each of the
    sampler's forwards: the whole weights sit on every GPU while it samples. `auto`: on when the resource
    plan says that fits the GPU's memory (off on the CPU and for the toy); ignored below ZeRO-3."""
    zero_stage: Literal["auto", 2, 3] | None = None
    """ZeRO stage, overriding the DeepSpeed JSON's: `auto` takes ZeRO-2 (whole weights on every GPU, no
    parameter gathers) when the resource plan says it fits the GPU's memory and ZeRO-3 when it does not
    (on the CPU: the JSON's stage); None = the JSON's."""
    memory_reserve: MemoryReserveConfig = Field(default_factory=MemoryReserveConfig)
    """GPU memory the `auto` choices keep free of the resource plan's peak."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """The trained model: adapter, weights, precision, LoRA."""
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    """The rollouts' sampler and which of its steps are trained."""
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(name="digit")], min_length=1)
    """The rewards summed (weighted) into the one the advantages are computed from; at least one."""
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    """Training and eval prompts."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Batch sizes, optimizer and GRPO loss."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """The fixed eval set, sampled with the ODE."""
    log: LogConfig = Field(default_factory=LogConfig)
    """TensorBoard, W&B, image grids, progress."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """How often checkpoints are saved and how many are kept."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Timeouts of a multi-process run: collectives while loading and while training, heartbeats."""

    @field_validator("rewards")
    @classmethod
    def _each_reward_once(cls, parts: list[RewardConfig]) -> list[RewardConfig]:
        from fastcps.rewards import component_name

        # each reward's component is logged under its name (a remote reward's: its args.name)
        names = [component_name(r.name, r.args) for r in parts]
        if len(set(names)) != len(names):
            remote = "remote" in [r.name for r in parts]
            hint = " (give each remote reward its own args.name)" if remote else ""
            raise ValueError(f"a reward may appear once, got {names}{hint}")
        return parts


def _allow_schema_key(schema: dict) -> None:
    """A config file may name its schema (``"$schema": "schema.json"``, for editors); the loader drops it."""
    schema["properties"] = {
        SCHEMA_KEY: {
            "type": "string",
            "description": "JSON Schema of this file (for editors; ignored by the loader).",
        },
        **schema["properties"],
    }


def schema_json() -> str:
    """``RunConfig``'s JSON Schema as committed in configs/schema.json."""
    return json.dumps(RunConfig.model_json_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcps.config", description=__doc__.splitlines()[0])
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of the run config")
    p.add_argument("--out", metavar="FILE", help="write the schema to FILE instead of printing it")
    args = p.parse_args(argv)
    if not args.schema:
        p.error("nothing to do: give --schema")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(schema_json())
    else:
        sys.stdout.write(schema_json())
    return 0
