"""What a run will cost, before any weight loads: ``python -m fastcps.plan --config X.json --world-size 8``.

Counted on the trainer's own code (``fastcps.plan.epoch``): ``rollout_epoch``, ``run_update`` and
``Trainer.evaluate`` run for one rank on stand-ins that record every transformer call, backward and
optimizer step; ZeRO's collectives follow from those calls. Measured, on fake tensors
(``fastcps.plan.measure``; no weights, no GPU): the real transformer is built from its config
(``configs/models/*.json``, copied from the hub; or ``<policy.pretrained>/transformer/`` when that is a
local folder), with the config's LoRA adapters, and run at the config's resolution, text length and
the counted calls' batch sizes: FLOPs of each call, of autograd's backward (and of gradient
checkpointing's re-forwards), the peak bytes of a training micro-step, a rollout forward and a VAE
decode (fp32, as the policies decode). Counted from sizes (``fastcps.plan.costs``,
``fastcps.plan.load``): ZeRO-2/3 partitions and buffers with DeepSpeed's defaults, frozen models at
published sizes (a local pipeline folder's text encoders from its files), the rollout's buffers, the
load phase, one checkpoint's files. Beside it, flow_grpo's own recipe (``plan_epoch.ANCHOR``).

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
import json
import sys
from pathlib import Path

from fastcps.config import ConfigError, RunConfig, load_config, validate_tree
from fastcps.plan import costs as pc
from fastcps.plan.choose import CHOICES, choice_name, choose, parse_reserve, reserve_gib, zero_traffic
from fastcps.runtime import GIB

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"  # in the repo checkout
if not MODELS.is_dir():  # an installed package: the configs/ folder of the working directory
    MODELS = Path("configs") / "models"
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 (NVIDIA's datasheet: 1979 with sparsity)


def model_files(cfg: RunConfig) -> dict[str, Path]:
    """transformer / scheduler / vae configs: the local pipeline folder's, else the shipped copies."""
    pol = cfg.policy
    local = Path(pol.pretrained) if pol.pretrained else None
    if local is not None and (local / "transformer" / "config.json").is_file():
        return {
            "transformer": local / "transformer" / "config.json",
            "vae": local / "vae" / "config.json",
            "scheduler": local / "scheduler" / "scheduler_config.json",
        }
    name = pol.pretrained.lower()
    if pol.name == "flux":
        stem = "flux1-schnell" if "schnell" in name else "flux1-dev"
        return {
            "transformer": MODELS / f"{stem}_transformer.json",
            "vae": MODELS / "flux1_vae.json",
            "scheduler": MODELS / f"{stem}_scheduler.json",
        }
    if pol.name == "sd3":
        if "large" in name:
            raise ConfigError(
                f"policy.pretrained = {pol.pretrained!r}: no shipped SD3.5-Large config; give a "
                "local pipeline folder or --model-config"
            )
        return {
            "transformer": MODELS / "sd3.5-medium_transformer.json",
            "vae": MODELS / "sd3.5_vae.json",
            "scheduler": MODELS / "sd3.5-medium_scheduler.json",
        }
    raise ConfigError(f"policy.name = {pol.name!r}: the plan covers flux and sd3 (the toy needs no plan)")


def policy_sigmas(family: str, scheduler_config: dict, resolution: int, num_steps: int):
    """The policy's own schedule (FLUX.1-dev: the resolution-dependent dynamic shift) without loading
    it: ``fastcps.schedule.pipeline_sigmas`` reads only the scheduler config and the token count."""
    from fastcps.schedule import pipeline_sigmas

    return pipeline_sigmas(
        scheduler_config, (resolution // 16) ** 2, num_steps, default_shift=1.0 if family == "flux" else 3.0
    )


def zero_section(cfg: RunConfig) -> dict:
    """``zero_optimization`` of the config's DeepSpeed JSON ({} when it has none)."""
    ds_path = Path(cfg.deepspeed_config)
    if not ds_path.is_file():
        raise ConfigError(f"DeepSpeed config {str(ds_path)!r} (config key `deepspeed_config`) not found")
    return json.loads(ds_path.read_text()).get("zero_optimization", {})


class Loader:
    """Builds (once per distinct shape) the measured Model of a config and its ZeRO settings."""

    def __init__(self, cfg: RunConfig, transformer_config: Path | None = None):
        self.files = model_files(cfg)
        if transformer_config is not None:
            self.files["transformer"] = transformer_config
        for key in ("transformer", "vae", "scheduler"):
            if not self.files[key].is_file():
                raise ConfigError(
                    f"{key} config {str(self.files[key])!r} not found (from policy.pretrained = "
                    f"{cfg.policy.pretrained!r}); pass --model-config or a local pipeline folder"
                )
        self.zero_section = zero_section(cfg)
        self.zero = pc.zero_settings(self.zero_section)
        self.scheduler = json.loads(self.files["scheduler"].read_text())
        self._models: dict = {}

    def load_zero(self, stage: int, offload: bool = False) -> pc.Zero:
        z = pc.zero_settings(self.zero_section, stage)
        z.offload_optimizer = offload or z.offload_optimizer
        return z

    def model(self, cfg: RunConfig) -> pc.Model:
        from fastcps.plan import measure
        from fastcps.policies.flux import FluxPolicy
        from fastcps.policies.sd3 import SD3Policy

        pol = cfg.policy
        if pol.resolution % 16:
            raise ConfigError(
                f"policy.resolution = {pol.resolution} must be a multiple of 16 (VAE x8, 2x2 patches)"
            )
        targets = list(pol.lora.target_modules) if pol.lora else []
        lora = None
        if pol.lora is not None:
            targets = targets or list((FluxPolicy if pol.name == "flux" else SD3Policy).default_lora_targets)
            lora = (pol.lora.r, float(pol.lora.alpha), tuple(targets))
        text = pol.max_sequence_length + (77 if pol.name == "sd3" else 0)  # SD3: CLIP's 77 + T5's tokens
        key = (lora, text, pol.resolution, pol.dtype)
        if key not in self._models:
            m = measure.meter(pol.name, str(self.files["transformer"]), pol.resolution, text, pol.dtype, lora)
            self._models[key] = self._describe(m, pol, text, lora)
        return self._models[key]

    def _describe(self, meter, pol, text: int, lora) -> pc.Model:
        from fastcps.plan import measure

        threshold = self.zero.param_persistence_threshold
        params = list(meter.model.parameters())
        if pol.lora is not None and "stage3_param_persistence_threshold" not in self.zero_section:
            # the trainer keeps LoRA matrices whole under ZeRO-3 (fastcps.engine.keep_lora_whole)
            threshold = max(threshold, max(p.numel() for p in params if p.requires_grad))
        largest = max(
            sum(p.numel() for p in mod.parameters(recurse=False) if p.numel() >= threshold)
            for mod in meter.model.modules()
        )
        c = meter.config
        res = pol.resolution
        latent = (
            (res // 16) ** 2 * c["in_channels"] if pol.name == "flux" else c["in_channels"] * (res // 8) ** 2
        )
        vae_path, dtype = str(self.files["vae"]), pc.VAE_DTYPE  # the policies decode in fp32
        return pc.Model(
            family=pol.name,
            params=sum(p.numel() for p in params),
            trained=sum(p.numel() for p in params if p.requires_grad),
            small=sum(p.numel() for p in params if p.numel() < threshold),
            largest_fetch=largest,
            meter_threshold=threshold,
            text_tokens=text,
            joint_dim=c["joint_attention_dim"],
            pooled_dim=c["pooled_projection_dim"],
            latent_numel=latent,
            vae_params=measure.vae_decode_peak(vae_path, res, 1, dtype)[0],
            meter=meter,
            vae_peak=lambda b: measure.vae_decode_peak(vae_path, res, b, dtype)[1],
            vae_flop=lambda b: b * measure.vae_decode_peak(vae_path, res, 1, dtype)[2],
            meter_lora=lora,
            sigmas=lambda n: policy_sigmas(pol.name, self.scheduler, res, n),
            text_encoder_params=local_text_encoder_params(pol.pretrained),
        )


def local_text_encoder_params(pretrained: str) -> int | None:
    """Parameters of a local pipeline folder's text encoders (``text_encoder*/*.safetensors``, read from
    the files' headers: no weights load); None for a hub id or a folder without them (the plan then
    counts the published sizes, ``costs.TEXT_ENCODERS``)."""
    from safetensors import safe_open

    folder = Path(pretrained) if pretrained else None
    if folder is None or not folder.is_dir():
        return None
    subfolders = sorted(d for d in folder.glob("text_encoder*") if d.is_dir())
    files = [sorted(d.glob("*.safetensors")) for d in subfolders]
    if not subfolders or not all(files):
        return None
    total = 0
    for f in (f for group in files for f in group):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                shape = fh.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def plan(
    cfg: RunConfig,
    world: int,
    model_config: Path | None = None,
    *,
    gpu_mem: float | None = None,
    reserve=None,
    mfu: float = 0.4,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
) -> dict:
    """Everything the report shows, as one dict (bytes, FLOPs, seconds; ``*_gib`` in GiB). ``gpu_mem``:
    the GPU's total memory in GiB as torch reports it; ``reserve``: a ``MemoryReserveConfig``, GiB, or
    None (the config's ``memory_reserve``)."""
    from fastcps.config import MemoryReserveConfig
    from fastcps.plan import epoch as pe
    from fastcps.plan import measure
    from fastcps.plan.load import load_phase

    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must lie in (0, 1], got {mfu}")
    if reserve is None:
        reserve = cfg.memory_reserve
    elif not isinstance(reserve, MemoryReserveConfig):
        reserve = MemoryReserveConfig(fraction=0.0, gib=float(reserve))
    loader = Loader(cfg, model_config)
    model = loader.model(cfg)
    kept = None if gpu_mem is None else reserve_gib(gpu_mem, reserve)
    limit = None if gpu_mem is None else (gpu_mem - kept) * GIB
    chosen = choose(cfg, world, loader, model, limit)
    cfg = pc.with_changes(
        cfg,
        {
            "policy.gradient_checkpointing": chosen["checkpointing"],
            "whole_model_sampling": chosen["whole_model_sampling"],
            **chosen["changes"],
        },
    )
    zero = loader.load_zero(chosen["stage"])
    n_mean, n_min, n_max = pc.mean_trained(cfg, model.sigmas(cfg.sampler.num_steps))
    counted = pe.counted_epoch(cfg, world, model)
    phases = {
        k: v * world
        for k, v in pe.phase_flops(counted, model.meter, model.vae_flop, chosen["checkpointing"]).items()
    }
    epoch_flop = sum(phases.values())
    c, t = pc.cfg_mult(cfg), cfg.train
    plain_fwd, plain_bwd = model.meter.flops("train", t.minibatch_size * c)
    images = t.prompts_per_epoch * t.images_per_prompt
    anchor_meter = measure.meter(
        cfg.policy.name,
        str(loader.files["transformer"]),
        cfg.policy.resolution,
        pe.ANCHOR["text_tokens"],
        cfg.policy.dtype,
        model.meter_lora,
    )
    anchor = {k: v * images for k, v in pe.anchor_flop_per_image(anchor_meter, model.vae_flop).items()}
    training = epoch_flop - phases["eval"]
    traffic = {choice_name(s, ck): zero_traffic(cfg, world, loader, model, s, ck) for s, ck in CHOICES}
    # DeepSpeed's ZeRO++ quantized weights (zero_quantized_weights: int8 blocks + scales) for slow links
    traffic["zero3+ckpt, quantized gathers"] = zero_traffic(
        cfg, world, loader, model, 3, True, gather_bytes_per_param=1.0
    )
    for ck in (False, True):  # whole_model_sampling: the rollout and the eval gather the model once each
        traffic[choice_name(3, ck) + WHOLE] = zero_traffic(
            cfg, world, loader, model, 3, ck, whole_sampling=True
        )
    chosen_traffic = choice_name(chosen["stage"], chosen["checkpointing"]) + (
        WHOLE if chosen["whole_model_sampling"] else ""
    )
    mem = {s: pc.memory(cfg, world, model, loader.load_zero(s)) for s in (2, 3)}
    mine = mem[3] if zero.stage >= 3 else mem[2]
    load = load_phase(cfg, world, model, zero.stage)
    acts = {
        "train": model.meter.activation("train", t.minibatch_size * c)[0],
        "train_checkpointed": model.meter.activation("ckpt", t.minibatch_size * c)[0],
        "rollout": model.meter.activation("nograd", t.rollout_batch_size * c)[0],
        "vae_decode": model.vae_peak(min(pc.DECODE_CHUNK, t.rollout_batch_size)),
    }
    seconds = epoch_flop / (world * peak_tflops * 1e12 * mfu)
    peak = max(mine["peak"], load["peak"])
    out = {
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
        "anchor": pe.ANCHOR["name"],
        "anchor_phase_flop": anchor,
        "anchor_epoch_flop": anchor["total"],
        "anchor_ratio": training / anchor["total"],
        "activation_peak_bytes": acts,
        "memory": mem,
        "peak_gib_per_gpu": mine["peak"] / GIB,
        "peak_phase": mine["peak_phase"],
        "load_phase": load,
        "load_peak_gib_per_gpu": load["peak"] / GIB,
        "peak_gib_by_choice": {choice_name(s, ck): v / GIB for (s, ck), v in chosen["peaks"].items()},
        # what fits first, cheapest first (fastcps.plan.choose.Candidate.key): the first is the choice
        "candidates": [
            {
                "choice": cand.name(),
                "micro_batch": cand.micro_batch or t.minibatch_size,
                "peak_gib": cand.peak / GIB,
                "zero_traffic_gb": cand.traffic / 1e9,
                "fits": None if limit is None else cand.peak <= limit,
            }
            for cand in sorted(
                chosen["candidates"], key=lambda c: (limit is not None and c.peak > limit, c.key())
            )
        ],
        "zero_traffic_bytes_per_gpu": traffic,
        "zero_param_traffic_bytes_per_gpu": traffic[chosen_traffic]["parameter all-gather"],
        "zero_param_gathers": traffic[chosen_traffic]["gathers"],
        "whole_model_sampling": chosen["whole_model_sampling"],
        "whole_sampling_peak_gib": None if (w := chosen["whole_sampling_peak"]) is None else w / GIB,
        "checkpoint_files": (ck := pc.checkpoint_files(cfg, world, model, zero.stage)),
        "checkpoint_bytes": sum(ck.values()),
        "save_host_peak_bytes": pc.save_host_peak(cfg, world, model, zero),
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "projected_epoch_s": seconds,
        "reserve": {"fraction": reserve.fraction, "gib": reserve.gib},
    }
    if gpu_mem is not None:
        out["gpu_mem_gib"] = gpu_mem
        out["reserve_gib"] = kept
        # the card's memory minus the planned peak (the reserve not subtracted): what is left for what the
        # plan does not count
        out["headroom_gib"] = gpu_mem - peak / GIB
        out["headroom_fraction"] = out["headroom_gib"] / gpu_mem
        out["fits"] = peak <= limit
        sug = pc.suggest(cfg, world, zero, limit, loader.model, loader.load_zero)
        out["suggestion"] = {"set": sug["flags"], "peak_gib": sug["peak"] / GIB, "fits": sug["fits"]}
    return out


WHOLE = ", whole-model sampling"  # the traffic table's suffix for whole_model_sampling


def main(argv=None) -> int:
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
