"""What a run will cost, before any weight loads: ``python -m fastcps.plan --config X.json --world-size 8``.

Measured, on fake tensors (``fastcps.measure``; no weights, no GPU): the real transformer is built from
its config (``configs/models/*.json``, copied from the hub; or ``<policy.pretrained>/transformer/`` when
that is a local folder), with the config's LoRA adapters, and run at the config's resolution, text
length and batch sizes: FLOPs of a forward and of autograd's backward (and of gradient checkpointing's
re-forwards), and the peak bytes of a training micro-step, a rollout forward and a VAE decode.
Counted around them (``fastcps.plan_costs``): the passes of an epoch, ZeRO-2/3 partitions, buffers
and gathers with DeepSpeed's defaults, frozen models at published sizes, the rollout's buffers.

Options: ``--gpu-mem GIB`` says whether the peak fits and, if not, which ``--set`` flags make it fit;
``--mfu`` / ``--peak-tflops`` turn the epoch's FLOPs into a projected time; ``--json`` prints one
JSON object instead of the table. Config errors exit with status 2 and name the key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastcps import plan_costs as pc
from fastcps.config import RunConfig
from fastcps.configlib import ConfigError, load_config, validate_tree

MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"  # in the repo checkout
if not MODELS.is_dir():  # an installed package: the configs/ folder of the working directory
    MODELS = Path("configs") / "models"
GIB = 2**30
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 (NVIDIA's datasheet: 1979 with sparsity)


def model_files(cfg: RunConfig) -> dict[str, Path]:
    """transformer / scheduler / vae configs: the local pipeline folder's, else the shipped copies."""
    pol = cfg.policy
    local = Path(pol.pretrained) if pol.pretrained else None
    if local is not None and (local / "transformer" / "config.json").is_file():
        return {"transformer": local / "transformer" / "config.json", "vae": local / "vae" / "config.json",
                "scheduler": local / "scheduler" / "scheduler_config.json"}
    name = pol.pretrained.lower()
    if pol.name == "flux":
        stem = "flux1-schnell" if "schnell" in name else "flux1-dev"
        return {"transformer": MODELS / f"{stem}_transformer.json", "vae": MODELS / "flux1_vae.json",
                "scheduler": MODELS / f"{stem}_scheduler.json"}
    if pol.name == "sd3":
        if "large" in name:
            raise ConfigError(f"policy.pretrained = {pol.pretrained!r}: no shipped SD3.5-Large config; give a "
                              "local pipeline folder or --model-config")
        return {"transformer": MODELS / "sd3.5-medium_transformer.json", "vae": MODELS / "sd3.5_vae.json",
                "scheduler": MODELS / "sd3.5-medium_scheduler.json"}
    raise ConfigError(f"policy.name = {pol.name!r}: the plan covers flux and sd3 (the toy needs no plan)")


def policy_sigmas(family: str, scheduler_config: dict, resolution: int, num_steps: int):
    """The policy's own schedule (FLUX.1-dev: the resolution-dependent dynamic shift) without loading
    it: ``fastcps.schedule.pipeline_sigmas`` reads only the scheduler config and the token count."""
    from fastcps.schedule import pipeline_sigmas

    return pipeline_sigmas(scheduler_config, (resolution // 16) ** 2, num_steps,
                           default_shift=1.0 if family == "flux" else 3.0)


class Loader:
    """Builds (once per distinct shape) the measured Model of a config and its ZeRO settings."""

    def __init__(self, cfg: RunConfig, transformer_config: Path | None = None):
        self.files = model_files(cfg)
        if transformer_config is not None:
            self.files["transformer"] = transformer_config
        for key in ("transformer", "vae", "scheduler"):
            if not self.files[key].is_file():
                raise ConfigError(f"{key} config {str(self.files[key])!r} not found (from policy.pretrained = "
                                  f"{cfg.policy.pretrained!r}); pass --model-config or a local pipeline folder")
        ds_path = Path(cfg.deepspeed_config)
        if not ds_path.is_file():
            raise ConfigError(f"DeepSpeed config {str(ds_path)!r} (config key `deepspeed_config`) not found")
        self.zero_section = json.loads(ds_path.read_text()).get("zero_optimization", {})
        self.zero = pc.zero_settings(self.zero_section)
        self.scheduler = json.loads(self.files["scheduler"].read_text())
        self._models: dict = {}

    def load_zero(self, stage: int, offload: bool = False) -> pc.Zero:
        z = pc.zero_settings(self.zero_section, stage)
        z.offload_optimizer = offload or z.offload_optimizer
        return z

    def model(self, cfg: RunConfig) -> pc.Model:
        from fastcps import measure
        from fastcps.policies.flux import FluxPolicy
        from fastcps.policies.sd3 import SD3Policy

        pol = cfg.policy
        if pol.resolution % 16:
            raise ConfigError(f"policy.resolution = {pol.resolution} must be a multiple of 16 (VAE x8, 2x2 patches)")
        targets = list(pol.lora.target_modules) if pol.lora else []
        lora = None
        if pol.lora is not None:
            targets = targets or list((FluxPolicy if pol.name == "flux" else SD3Policy).default_lora_targets)
            lora = (pol.lora.r, float(pol.lora.alpha), tuple(targets))
        text = pol.max_sequence_length + (77 if pol.name == "sd3" else 0)  # SD3: CLIP's 77 + T5's tokens
        key = (lora, text, pol.resolution, pol.dtype)
        if key not in self._models:
            m = measure.meter(pol.name, str(self.files["transformer"]), pol.resolution, text, pol.dtype, lora)
            self._models[key] = self._describe(m, pol, text)
        return self._models[key]

    def _describe(self, meter, pol, text: int) -> pc.Model:
        from fastcps import measure

        threshold = self.zero.param_persistence_threshold
        params = list(meter.model.parameters())
        largest = max(sum(p.numel() for p in mod.parameters(recurse=False) if p.numel() >= threshold)
                      for mod in meter.model.modules())
        c = meter.config
        res = pol.resolution
        latent = (res // 16) ** 2 * c["in_channels"] if pol.name == "flux" else c["in_channels"] * (res // 8) ** 2
        vae_path, dtype = str(self.files["vae"]), pol.dtype
        return pc.Model(
            family=pol.name, params=sum(p.numel() for p in params),
            trained=sum(p.numel() for p in params if p.requires_grad),
            small=sum(p.numel() for p in params if p.numel() < threshold), largest_fetch=largest,
            text_tokens=text, joint_dim=c["joint_attention_dim"], pooled_dim=c["pooled_projection_dim"],
            latent_numel=latent, vae_params=measure.vae_decode_peak(vae_path, res, 1, dtype)[0], meter=meter,
            vae_peak=lambda b: measure.vae_decode_peak(vae_path, res, b, dtype)[1],
            sigmas=lambda n: policy_sigmas(pol.name, self.scheduler, res, n))


def plan(cfg: RunConfig, world: int, model_config: Path | None = None, *, gpu_mem: float | None = None,
         reserve: float = 1.0, mfu: float = 0.4, peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> dict:
    """Everything the report shows, as one dict (bytes, FLOPs, seconds; ``*_gib`` in GiB)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must lie in (0, 1], got {mfu}")
    loader = Loader(cfg, model_config)
    model = loader.model(cfg)
    n_mean, n_min, n_max = pc.mean_trained(cfg, model.sigmas(cfg.sampler.num_steps))
    fl = pc.flops(cfg, world, model, n_mean)
    mem = {s: pc.memory(cfg, world, model, loader.load_zero(s)) for s in (2, 3)}
    mine = mem[3] if loader.zero.stage >= 3 else mem[2]
    c, t = pc.cfg_mult(cfg), cfg.train
    acts = {"train": model.meter.step("train", t.minibatch_size * c).peak,
            "train_checkpointed": model.meter.step("ckpt", t.minibatch_size * c).peak,
            "rollout": model.meter.step("nograd", t.rollout_batch_size * c).peak,
            "vae_decode": model.vae_peak(min(4, t.rollout_batch_size))}
    other = pc.with_changes(cfg, {"policy.gradient_checkpointing": not cfg.policy.gradient_checkpointing})
    other_peak = pc.memory(other, world, model, loader.zero)["peak"]
    ckpt_peaks = {cfg.policy.gradient_checkpointing: mine["peak"], not cfg.policy.gradient_checkpointing: other_peak}
    traffic = pc.zero_traffic(cfg, world, model, n_mean)
    seconds = fl["epoch"] / (world * peak_tflops * 1e12 * mfu)
    out = {
        "config": cfg.name, "world_size": world, "zero_stage": loader.zero.stage, "files": {k: str(v) for k, v in
                                                                                          loader.files.items()},
        "transformer_params": model.params - (model.trained if cfg.policy.lora else 0),
        "trained_params": model.trained, "lora": cfg.policy.lora is not None,
        "images_per_rank": fl["passes"]["per_rank"], "optimizer_steps": fl["passes"]["optimizer_steps"],
        "trained_steps_per_image": n_mean, "trained_steps_range": [n_min, n_max], "cfg_batch_multiplier": c,
        "forward_flop_per_image": fl["forward_per_image"], "backward_flop_per_image": fl["backward_per_image"],
        "recompute_flop_per_image": fl["recompute_per_image"], "backward": "autograd on fake CPU tensors",
        "phase_flop": fl["phases"], "epoch_flop": fl["epoch"], "passes": fl["passes"],
        "flow_grpo_phase_flop": fl["flow_grpo_phases"], "flow_grpo_epoch_flop": fl["flow_grpo_epoch"],
        "activation_peak_bytes": acts, "memory": mem, "peak_gib_per_gpu": mine["peak"] / GIB,
        "peak_phase": mine["peak_phase"],
        "peak_gib_with_checkpointing": ckpt_peaks[True] / GIB, "peak_gib_without_checkpointing": ckpt_peaks[False] / GIB,
        "zero_traffic_bytes_per_gpu": traffic, "mfu": mfu, "peak_tflops": peak_tflops,
        "projected_epoch_s": seconds, "flow_grpo_projected_epoch_s": fl["flow_grpo_epoch"] / fl["epoch"] * seconds,
        "reserve_gib": reserve,
    }
    if gpu_mem is not None:
        limit = (gpu_mem - reserve) * GIB
        out["gpu_mem_gib"] = gpu_mem
        out["fits"] = mine["peak"] <= limit
        sug = pc.suggest(cfg, world, loader.zero, limit, loader.model, loader.load_zero)
        out["suggestion"] = {"set": sug["flags"], "peak_gib": sug["peak"] / GIB, "fits": sug["fits"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FLOPs, memory and ZeRO traffic of a run, measured on fake tensors "
                                             "(loads no weights, needs no GPU)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model-config", help="transformer config.json (default: configs/models/ by policy)")
    ap.add_argument("--gpu-mem", type=float, metavar="GIB", help="GPU memory: does the run fit, and if not, how")
    ap.add_argument("--reserve", type=float, default=1.0, metavar="GIB",
                    help="kept free of --gpu-mem for the CUDA context, NCCL and fragmentation (not measured; 1)")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of --peak-tflops reached (0.4): projection only")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="per-GPU dense bf16 peak (989: H100 SXM)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        validate_tree(cfg, world_size=args.world_size)
        out = plan(cfg, args.world_size, Path(args.model_config) if args.model_config else None,
                   gpu_mem=args.gpu_mem, reserve=args.reserve, mfu=args.mfu, peak_tflops=args.peak_tflops)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, default=float))
    else:
        from fastcps.plan_report import report

        report(cfg, out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
