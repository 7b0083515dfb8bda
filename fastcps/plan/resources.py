"""What a run will cost, before any weight loads: ``python -m fastcps.plan --config X.json --world-size 8``.

Counted on the trainer's own code (``fastcps.plan.epoch``): ``rollout_epoch``, ``run_update`` and
the trainer's eval (passed in: ``evaluate``) run for one rank on stand-ins that record every
transformer call, backward and optimizer step; ZeRO's collectives follow from those calls. Measured,
on fake tensors (``fastcps.plan.measure``; no weights, no GPU): the real transformer is built from its config
(``configs/models/*.json``, copied from the hub; or ``<policy.pretrained>/transformer/`` when that is a
local folder), with the config's LoRA adapters, and run at the config's resolution, text length and
the counted calls' batch sizes: FLOPs of each call, of autograd's backward (and of gradient
checkpointing's re-forwards), the peak bytes of a training micro-step, a rollout forward and a VAE
decode (fp32, as the policies decode). Counted from sizes (``fastcps.plan.costs``,
``fastcps.plan.load``): ZeRO-2/3 partitions and buffers with DeepSpeed's defaults, frozen models at
published sizes (a local pipeline folder's text encoders from its files), the rollout's buffers, the
load phase, one checkpoint's files. Beside it, the family's anchor recipe (``FamilyPlan.anchor_for``:
flow_grpo's for FLUX and SD3.5, FlowCPS's for Qwen-Image and the editing models; the one with the config's
sampling and trained steps where a family has several). What the plan knows of a family comes from
its registry entry (``fastcps.policies.families``, ``fastcps.policies.plan_facts``).

``zero_stage`` / ``policy.gradient_checkpointing`` / ``whole_model_sampling`` / ``train.micro_batch``
= "auto" take the cheapest choice that fits ``--gpu-mem`` minus the reserve (``fastcps.plan.choose``;
the trainer does the same for the smallest GPU of its run: ``resolve_auto``).

Options: ``--gpu-mem GIB`` (the total memory torch reports: 79.1 for an 80 GB H100) says whether the
peak fits and, if not, which ``--set`` flags make it fit; ``--reserve`` (8% or GiB; default the config's
``memory_reserve``: 8 %) what the choice keeps free for what the plan does not count;
``--mfu`` / ``--peak-tflops`` turn the epoch's FLOPs into a projected time; ``--json`` prints one
JSON object instead of the table. Config errors exit with status 2 and name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fastcps.config import ConfigError, MemoryReserveConfig, RunConfig, load_config, validate_tree
from fastcps.plan import costs as pc
from fastcps.plan.choose import CHOICES, choice_name, choose, parse_reserve, reserve_gib, zero_traffic
from fastcps.plan.loader import Loader, local_text_encoder_params, model_files, policy_sigmas  # noqa: F401
from fastcps.runtime import GIB

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 (NVIDIA's datasheet: 1979 with sparsity)
WHOLE = ", whole-model sampling"  # the traffic table's suffix for whole_model_sampling


def plan(
    cfg: RunConfig,
    world: int,
    model_config: Path | None = None,
    *,
    evaluate,
    gpu_mem: float | None = None,
    reserve=None,
    mfu: float = 0.4,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
) -> dict:
    """Everything the report shows, as one dict (bytes, FLOPs, seconds; ``*_gib`` in GiB). ``evaluate``:
    the trainer's eval on given parts (``fastcps.trainer.evaluate_with``), counted with the epoch;
    ``gpu_mem``: the GPU's total memory in GiB as torch reports it; ``reserve``: a
    ``MemoryReserveConfig``, GiB, or None (the config's ``memory_reserve``)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must lie in (0, 1], got {mfu}")
    reserve = reserve_config(cfg, reserve)
    loader = Loader(cfg, model_config, evaluate=evaluate)
    model = loader.model(cfg)
    kept = None if gpu_mem is None else reserve_gib(gpu_mem, reserve)
    limit = None if gpu_mem is None else (gpu_mem - kept) * GIB
    chosen = choose(cfg, world, loader, model, limit)
    cfg = with_choice(cfg, chosen)
    zero = loader.load_zero(chosen["stage"])
    out = run_section(cfg, world, zero, chosen, loader, model)
    out.update(epoch_section(cfg, world, loader, model, chosen["checkpointing"]))
    out.update(memory_section(cfg, world, loader, model, zero))
    out.update(choice_section(cfg, chosen, limit))
    out.update(traffic_section(cfg, world, loader, model, chosen))
    out.update(checkpoint_section(cfg, world, model, zero))
    out["mfu"], out["peak_tflops"] = mfu, peak_tflops
    out["projected_epoch_s"] = out["epoch_flop"] / (world * peak_tflops * 1e12 * mfu)
    out["reserve"] = {"fraction": reserve.fraction, "gib": reserve.gib}
    if gpu_mem is not None:
        peak = max(out["memory"][3 if zero.stage >= 3 else 2]["peak"], out["load_phase"]["peak"])
        out.update(fit_section(cfg, world, loader, zero, gpu_mem, kept, limit, peak))
    return out


def reserve_config(cfg: RunConfig, reserve) -> MemoryReserveConfig:
    """``reserve`` as a ``MemoryReserveConfig``: the config's ``memory_reserve`` for None, else GiB."""
    if reserve is None:
        return cfg.memory_reserve
    if isinstance(reserve, MemoryReserveConfig):
        return reserve
    return MemoryReserveConfig(fraction=0.0, gib=float(reserve))


def with_choice(cfg: RunConfig, chosen: dict) -> RunConfig:
    """``cfg`` with the ``auto`` choice made concrete (checkpointing, whole-model sampling, micro-batch)."""
    return pc.with_changes(
        cfg,
        {
            "policy.gradient_checkpointing": chosen["checkpointing"],
            "whole_model_sampling": chosen["whole_model_sampling"],
            **chosen["changes"],
        },
    )


def run_section(cfg: RunConfig, world: int, zero: pc.Zero, chosen: dict, loader, model: pc.Model) -> dict:
    """The run as chosen: its settings, files and parameter counts."""
    t = cfg.train
    return {
        "config": cfg.name,
        "world_size": world,
        "zero_stage": zero.stage,
        "gradient_checkpointing": chosen["checkpointing"],
        "micro_batch": t.minibatch_size,
        "rollout_batch_size": t.rollout_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "files": {k: str(v) for k, v in loader.files.items()},
        "transformer_params": model.params - (model.trained if cfg.policy.lora else 0),
        "trained_params": model.trained,
        "lora": cfg.policy.lora is not None,
        "gathered_params": model.params - model.small,
    }


def epoch_section(cfg: RunConfig, world: int, loader, model: pc.Model, checkpointing: bool) -> dict:
    """The counted epoch: its calls and FLOPs per phase, and the family's anchor recipe beside it."""
    from fastcps.plan import epoch as pe

    n_mean, n_min, n_max = pc.mean_trained(cfg, model.sigmas(cfg.sampler.num_steps))
    counted = pe.counted_epoch(cfg, world, model)
    per_rank = pe.phase_flops(counted, model.meter, model.vae_flop, checkpointing)
    phases = {k: v * world for k, v in per_rank.items()}
    epoch_flop = sum(phases.values())
    c, t = pc.cfg_mult(cfg), cfg.train
    plain_fwd, plain_bwd = model.meter.flops("train", t.minibatch_size * c)
    recipe = model.facts.anchor_for(cfg.sampler.num_steps, n_mean)
    anchor = anchor_flop(cfg, loader, model, recipe)
    training = epoch_flop - phases["eval"]
    return {
        "images_per_rank": counted["images_per_rank"],
        "optimizer_steps": counted["optimizer_steps"],
        "trained_steps_per_image": n_mean,
        "trained_steps_range": [n_min, n_max],
        "cfg_batch_multiplier": c,
        "forward_flop_per_image": plain_fwd / (t.minibatch_size * c) * c,
        "backward_flop_per_image": plain_bwd / (t.minibatch_size * c) * c,
        "calls_per_rank": {
            f"{ph} ({kind}, {b} samples)": n for (ph, kind, b), n in sorted(counted["calls"].items())
        },
        "phase_flop": phases,
        "epoch_flop": epoch_flop,
        "training_epoch_flop": training,
        "anchor": recipe.name,
        "anchor_recipe": dataclasses.asdict(recipe),
        "anchor_phase_flop": anchor,
        "anchor_epoch_flop": anchor["total"],
        "anchor_ratio": training / anchor["total"],
    }


def anchor_flop(cfg: RunConfig, loader, model: pc.Model, anchor) -> dict:
    """The anchor recipe's FLOPs per phase for the config's images per epoch, on the same transformer
    measured at the anchor's text length (the run's when the anchor gives none)."""
    from fastcps.plan import epoch as pe
    from fastcps.plan import measure

    pol, t = cfg.policy, cfg.train
    text = anchor.text_tokens if anchor.text_tokens is not None else model.text_tokens
    meter = measure.meter(
        pol.name, str(loader.files["transformer"]), pol.resolution, text, pol.dtype, model.meter_lora
    )
    images = t.prompts_per_epoch * t.images_per_prompt
    return {k: v * images for k, v in pe.anchor_flop_per_image(anchor, meter, model.vae_flop).items()}


def memory_section(cfg: RunConfig, world: int, loader, model: pc.Model, zero: pc.Zero) -> dict:
    """Memory per GPU: the measured activations, every phase's terms under ZeRO-2 and -3, the load phase."""
    from fastcps.plan.load import load_phase

    c, t = pc.cfg_mult(cfg), cfg.train
    mem = {s: pc.memory(cfg, world, model, loader.load_zero(s)) for s in (2, 3)}
    mine = mem[3] if zero.stage >= 3 else mem[2]
    load = load_phase(cfg, world, model, zero.stage)
    acts = {
        "train": model.meter.activation("train", t.minibatch_size * c)[0],
        "train_checkpointed": model.meter.activation("ckpt", t.minibatch_size * c)[0],
        "rollout": model.meter.activation("nograd", t.rollout_batch_size * c)[0],
        "vae_decode": model.vae_peak(min(pc.DECODE_CHUNK, t.rollout_batch_size)),
    }
    return {
        "activation_peak_bytes": acts,
        "memory": mem,
        "peak_gib_per_gpu": mine["peak"] / GIB,
        "peak_phase": mine["peak_phase"],
        "load_phase": load,
        "load_peak_gib_per_gpu": load["peak"] / GIB,
    }


def choice_section(cfg: RunConfig, chosen: dict, limit: float | None) -> dict:
    """The peak of every (stage, checkpointing) choice and the candidates, what fits first, cheapest
    first (``fastcps.plan.choose.Candidate.key``): the first is the choice."""
    ordered = sorted(chosen["candidates"], key=lambda c: (limit is not None and c.peak > limit, c.key()))
    return {
        "peak_gib_by_choice": {choice_name(s, ck): v / GIB for (s, ck), v in chosen["peaks"].items()},
        "candidates": [
            {
                "choice": cand.name(),
                "micro_batch": cand.micro_batch or cfg.train.minibatch_size,
                "peak_gib": cand.peak / GIB,
                "zero_traffic_gb": cand.traffic / 1e9,
                "fits": None if limit is None else cand.peak <= limit,
            }
            for cand in ordered
        ],
    }


def traffic_section(cfg: RunConfig, world: int, loader, model: pc.Model, chosen: dict) -> dict:
    """ZeRO's collectives per GPU per epoch for every choice, and the chosen one's."""
    traffic = {choice_name(s, ck): zero_traffic(cfg, world, loader, model, s, ck) for s, ck in CHOICES}
    # DeepSpeed's ZeRO++ quantized weights (zero_quantized_weights: int8 blocks + scales) for slow links
    traffic["zero3+ckpt, quantized gathers"] = zero_traffic(
        cfg, world, loader, model, 3, True, gather_bytes_per_param=1.0
    )
    for ck in (False, True):  # whole_model_sampling: the rollout and the eval gather the model once each
        traffic[choice_name(3, ck) + WHOLE] = zero_traffic(
            cfg, world, loader, model, 3, ck, whole_sampling=True
        )
    mine = choice_name(chosen["stage"], chosen["checkpointing"]) + (
        WHOLE if chosen["whole_model_sampling"] else ""
    )
    whole = chosen["whole_sampling_peak"]
    return {
        "zero_traffic_bytes_per_gpu": traffic,
        "zero_param_traffic_bytes_per_gpu": traffic[mine]["parameter all-gather"],
        "zero_param_gathers": traffic[mine]["gathers"],
        "whole_model_sampling": chosen["whole_model_sampling"],
        "whole_sampling_peak_gib": None if whole is None else whole / GIB,
    }


def checkpoint_section(cfg: RunConfig, world: int, model: pc.Model, zero: pc.Zero) -> dict:
    """One checkpoint's files and the host memory rank 0 holds while it writes them."""
    files = pc.checkpoint_files(cfg, world, model, zero.stage)
    return {
        "checkpoint_files": files,
        "checkpoint_bytes": sum(files.values()),
        "save_host_peak_bytes": pc.save_host_peak(cfg, world, model, zero),
    }


def fit_section(cfg, world, loader, zero, gpu_mem: float, kept: float, limit: float, peak: float) -> dict:
    """Whether the planned ``peak`` fits ``gpu_mem`` GiB minus the reserve, the headroom (the card's
    memory minus the peak, the reserve not subtracted: what is left for what the plan does not count)
    and, when it does not fit, the cheapest ``--set`` flags that make it fit."""
    from fastcps.plan.suggest import suggest

    headroom = gpu_mem - peak / GIB
    sug = suggest(cfg, world, zero, limit, loader.model, loader.load_zero)
    return {
        "gpu_mem_gib": gpu_mem,
        "reserve_gib": kept,
        "headroom_gib": headroom,
        "headroom_fraction": headroom / gpu_mem,
        "fits": peak <= limit,
        "suggestion": {"set": sug["flags"], "peak_gib": sug["peak"] / GIB, "fits": sug["fits"]},
    }


def main(argv=None, *, evaluate) -> int:
    """The command line; ``evaluate``: the trainer's eval on given parts (``fastcps.plan.__main__``
    passes ``fastcps.trainer.evaluate_with``)."""
    ap = argparse.ArgumentParser(
        prog="python -m fastcps.plan",
        description="FLOPs, memory and ZeRO traffic of a run, measured on fake tensors "
        "(loads no weights, needs no GPU)",
    )
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model-config", help="transformer config.json (default: configs/models/ by policy)")
    ap.add_argument(
        "--gpu-mem",
        type=float,
        metavar="GIB",
        help="the GPU's total memory in GiB as torch reports it (an 80 GB H100: 79.1): does the run fit, "
        "and if not, how; the auto settings are chosen for it",
    )
    ap.add_argument(
        "--reserve",
        metavar="PCT|GIB",
        help="kept free of --gpu-mem for the CUDA context, cuBLAS/NCCL workspaces and fragmentation, which "
        "the plan does not count: 8%% of the GPU or GiB (default: the config's memory_reserve, 8%%)",
    )
    ap.add_argument(
        "--mfu", type=float, default=0.4, help="fraction of --peak-tflops reached (0.4): projection only"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_BF16_DENSE_TFLOPS,
        help="per-GPU dense bf16 peak (989: H100 SXM)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        validate_tree(cfg, world_size=args.world_size)
        out = plan(
            cfg,
            args.world_size,
            Path(args.model_config) if args.model_config else None,
            evaluate=evaluate,
            gpu_mem=args.gpu_mem,
            reserve=None if args.reserve is None else parse_reserve(args.reserve),
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, default=float))
    else:
        from fastcps.plan.report import report

        report(cfg, out, sys.stdout)
    return 0
