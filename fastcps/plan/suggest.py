"""The cheapest changes that make a config fit a GPU (``suggest``), for ``python -m fastcps.plan
--gpu-mem``: the levers (``levers``) in order, each relaxed again as far as the others allow.
"""

from __future__ import annotations

from fastcps.config import RunConfig
from fastcps.plan.costs import Zero, memory, with_changes


def smaller_batches(per_rank: int, current: int) -> list[int]:
    return [b for b in range(current - 1, 0, -1) if per_rank % b == 0]


def levers(cfg: RunConfig, world: int, zero: Zero) -> list[list[tuple[dict, dict]]]:
    """The changes that lower the peak, cheapest first; each lever lists its settings mildest first as
    (changes to the RunConfig or to ZeRO ("zero.stage", "zero.offload_optimizer"), --set flags)."""
    t, p = cfg.train, cfg.policy
    per_rank = t.prompts_per_epoch * t.images_per_prompt // world
    out = []
    if not p.gradient_checkpointing:
        out.append([({"policy.gradient_checkpointing": True}, {"policy.gradient_checkpointing": "true"})])
    minibatch = []
    for b in smaller_batches(per_rank, t.minibatch_size):
        images = t.minibatch_size * t.gradient_accumulation_steps  # keep the images per optimizer step
        gas = (
            images // b
            if images % b == 0 and (per_rank // b) % (images // b) == 0
            else t.gradient_accumulation_steps
        )
        minibatch.append(
            (
                {"train.minibatch_size": b, "train.gradient_accumulation_steps": gas},
                {"train.minibatch_size": b, "train.gradient_accumulation_steps": gas},
            )
        )
    out.append(minibatch)
    out.append(
        [
            ({"train.rollout_batch_size": b}, {"train.rollout_batch_size": b})
            for b in smaller_batches(per_rank, t.rollout_batch_size)
        ]
    )
    if not p.offload_frozen:
        out.append([({"policy.offload_frozen": True}, {"policy.offload_frozen": "true"})])
    if p.lora is None:
        from fastcps.config import LoraConfig

        out.append([({"policy.lora": LoraConfig()}, {"policy.lora.r": 64})])
    if zero.stage < 3:
        out.append([({"zero.stage": 3}, {"deepspeed_config": "configs/ds_zero3.json"})])
    if not zero.offload_optimizer:
        out.append(
            [
                (
                    {"zero.offload_optimizer": True},
                    {"deepspeed_config": '<a copy with zero_optimization.offload_optimizer.device = "cpu">'},
                )
            ]
        )
    return [lever for lever in out if lever]


def suggest(cfg: RunConfig, world: int, zero: Zero, limit: float, load_model, load_zero) -> dict:
    """The cheapest changes after which the peak fits ``limit`` bytes: levers are taken in order
    (``levers``), each at its mildest setting that fits, else its strongest; then each taken lever is
    relaxed again as far as the others allow. ``load_model(cfg)`` / ``load_zero(stage, offload)`` give
    the Model and Zero of a changed config."""

    def peak(chosen: list[dict]) -> float:
        merged = {k: v for changes in chosen for k, v in changes.items()}
        z = load_zero(
            merged.pop("zero.stage", zero.stage), merged.pop("zero.offload_optimizer", zero.offload_optimizer)
        )
        c = with_changes(cfg, merged)
        return memory(c, world, load_model(c), z)["peak"]

    ladder = levers(cfg, world, zero)
    chosen: dict[int, int] = {}  # lever index -> setting index

    def setting(override: dict | None = None, skip: int | None = None) -> list[dict]:
        picks = {**chosen, **(override or {})}
        return [ladder[i][j][0] for i, j in picks.items() if i != skip]

    best = peak([])
    for i, lever in enumerate(ladder):
        if best <= limit:
            break
        for j in range(len(lever)):
            if peak(setting({i: j})) <= limit:
                chosen[i] = j
                break
        else:
            if peak(setting({i: len(lever) - 1})) < best:
                chosen[i] = len(lever) - 1
        best = peak(setting())
    if best <= limit:  # relax: drop a lever, or take its mildest setting that still fits
        for i in sorted(chosen):
            if peak(setting(skip=i)) <= limit:
                del chosen[i]
                continue
            for j in range(chosen[i]):
                if peak(setting({i: j})) <= limit:
                    chosen[i] = j
                    break
        best = peak(setting())
    flags = {k: v for i, j in sorted(chosen.items()) for k, v in ladder[i][j][1].items()}
    return {"flags": [f"{k}={v}" for k, v in flags.items()], "peak": best, "fits": best <= limit}
