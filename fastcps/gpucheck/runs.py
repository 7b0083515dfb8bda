"""The training parts of ``fastcps.gpucheck``: the toy trainer on the device, and one GRPO epoch of the
real-size FLUX.1-dev architecture with random weights. Each returns figures as rows
``{"part", "metric", "value", "unit", "note"}``; the device is a parameter so that the CPU suite can run
the same code at tiny sizes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fastcps import distributed as dist
from fastcps.config import RunConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def row(part: str, metric: str, value, unit: str = "", note: str = "") -> dict:
    return {"part": part, "metric": metric, "value": value, "unit": unit, "note": note}


def _trainer(cfg: RunConfig, run_dir: Path, policy=None):
    from fastcps.trainer import Trainer

    dist.init()
    return Trainer(cfg, run_dir, policy=policy)


def logprob_agreement(trainer, epoch: int) -> tuple[float, float]:
    """Rollout log-probs against the training forward's for the same (x_t, x', σ) of one epoch:
    (max |Δ log p|, max |exp(Δ) − 1|). Batch sizes differ (rollout vs minibatch), as in training."""
    from fastcps.rollout import epoch_steps, rollout_epoch
    from fastcps.update import minibatches, recompute_old_logprobs

    cfg = trainer.cfg
    data = rollout_epoch(
        cfg,
        epoch,
        epoch_steps(cfg, epoch, trainer.policy),
        trainer.policy,
        trainer.engine,
        trainer.reward_fn,
        trainer.encodings,
        (trainer.prompts, trainer.prompt_meta),
        device=trainer.device,
    )
    batches = minibatches(
        data.x_t.shape[0], cfg.train.minibatch_size, (cfg.seed, epoch, 4, 0, 0), trainer.device
    )
    train_lp = recompute_old_logprobs(
        trainer.policy, trainer.engine, data, batches, clip_range=cfg.train.clip_range
    )
    delta = (train_lp - data.log_prob).double()
    return float(delta.abs().max()), float(delta.exp().sub(1).abs().max())


def toy_run(device: torch.device, dtypes=("fp32", "bf16"), epochs: int = 2) -> list[dict]:
    """The digits config on ``device`` (Triton path on CUDA), old log-probs from the rollout so that
    ``train/ratio_dev`` measures rollout-vs-training agreement; then that agreement directly."""
    from fastcps.ops.dispatch import choose_impl

    rows = [row("toy", "impl", choose_impl(torch.empty(1, device=device)))]
    for dt in dtypes:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                RunConfig,
                str(CONFIGS / "digits_cps.json"),
                [
                    f"output_dir={tmp}",
                    f"policy.dtype={dt}",
                    f"train.num_epochs={epochs}",
                    "eval.every=0",
                    "log.progress=false",
                    "log.images_every=0",
                    "checkpoint.every=0",
                    "train.old_logprob=rollout",
                    f"deepspeed_config={CONFIGS / 'ds_zero3.json'}",
                ],
            )
            trainer = _trainer(cfg, Path(tmp) / "toy")
            metrics = [trainer.run_epoch(e) for e in range(epochs)]
            dlp, dratio = logprob_agreement(trainer, epochs)
            trainer.logger.close()
        last = metrics[-1]
        rows += [
            row(
                "toy",
                f"{dt}/ratio_dev_first_update",
                last["train/ratio_dev"],
                "",
                "old_logprob=rollout: max |ratio-1| before the first optimizer step",
            ),
            row(
                "toy",
                f"{dt}/logprob_max_abs_diff",
                dlp,
                "",
                "rollout vs training forward, same x_t, x', sigma",
            ),
            row("toy", f"{dt}/ratio_max_dev", dratio),
            row("toy", f"{dt}/reward_mean_last_epoch", last["reward/mean"]),
            row("toy", f"{dt}/images_per_s", last["perf/images_per_s"], "img/s"),
            row("toy", f"{dt}/epoch_s", last["time/epoch_s"], "s"),
        ]
    return rows


def build_big_flux(model_config: dict, device, dtype=torch.bfloat16):
    """The FLUX transformer of ``model_config`` with random weights, built directly on ``device``."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FluxTransformer2DModel.from_config(
                {k: v for k, v in model_config.items() if not k.startswith("_")}
            )
    finally:
        torch.set_default_dtype(previous)


def flux_epoch(
    device: torch.device,
    *,
    model_config: dict | None = None,
    resolution: int = 512,
    images: int = 16,
    text_dims: tuple[int, int] = (4096, 768),
    max_sequence_length: int = 512,
    lora_r: int = 64,
    gpu_mem_gib: float | None = None,
) -> list[dict]:
    """configs/flux_pickscore.json's recipe on one process (bf16, LoRA r 64, CPS with a 3-step SDE window
    of 6 steps, recompute) with the transformer of ``model_config`` (default: FLUX.1-dev's, 11.9 B
    parameters) in random weights, tiny text encoders of the real widths, a tiny VAE and the
    jpeg_compressibility reward, at the settings the trainer's ``auto`` takes for this GPU (ZeRO stage,
    checkpointing, whole-model sampling, micro-batch: ``fastcps.plan.choose`` on the big transformer and
    ``gpu_mem_gib``, default the device's total memory; on the CPU without it: the settings as written):
    one warm-up epoch, then one measured epoch: images/s, the epoch split, and the run's peak memory
    (``max_memory_reserved`` and ``max_memory_allocated`` over load, warm-up and measured epoch) beside
    the plan's peak for the same settings."""
    from fastcps.perf import peak_tflops
    from fastcps.policies import build_policy
    from fastcps.testing import save_tiny_flux

    if model_config is None:
        model_config = json.loads((CONFIGS / "models" / "flux1-dev_transformer.json").read_text())
    if gpu_mem_gib is None and device.type == "cuda":
        gpu_mem_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_flux(Path(tmp) / "flux", t5_dim=text_dims[0], clip_dim=text_dims[1])
        transformer_json = Path(tmp) / "transformer.json"  # one path: the plan measures it once
        transformer_json.write_text(json.dumps(model_config))
        per_prompt = 8
        sets = [
            f"policy.pretrained={folder}",
            "policy.offload_frozen=false",
            f"policy.lora.r={lora_r}",
            f"policy.lora.alpha={2.0 * lora_r}",
            f"policy.resolution={resolution}",
            f"policy.max_sequence_length={max_sequence_length}",
            'rewards=[{"name": "jpeg_compressibility"}]',
            f"train.prompts_per_epoch={images // per_prompt}",
            f"train.images_per_prompt={per_prompt}",
            "train.rollout_batch_size=8",
            "train.minibatch_size=4",
            "train.gradient_accumulation_steps=2",
            "train.micro_batch=auto",
            "train.num_epochs=2",
            "eval.every=0",
            "log.progress=false",
            "zero_stage=auto",
            "policy.gradient_checkpointing=auto",
            "whole_model_sampling=auto",
            "log.images_every=0",
            "checkpoint.every=0",
            f"output_dir={tmp}",
            f"deepspeed_config={CONFIGS / 'ds_zero3.json'}",
            f"prompts.source={CONFIGS / 'prompts' / 'pickscore.txt'}",
        ]
        cfg = auto_settings(
            load_config(RunConfig, str(CONFIGS / "flux_pickscore.json"), sets), transformer_json, gpu_mem_gib
        )
        lora = cfg.policy.lora
        policy = build_policy(cfg.policy.model_copy(update={"lora": None}), device)  # tiny, replaced next
        policy.transformer = build_big_flux(model_config, device).train()
        if cfg.policy.gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        policy.add_lora(lora.r, lora.alpha)
        n_params = sum(p.numel() for p in policy.transformer.parameters())
        trainer = _trainer(cfg, Path(tmp) / "flux", policy=policy)
        trainer.run_epoch(0)  # warm-up: kernel compilation, allocator, DeepSpeed buffers
        m = trainer.run_epoch(1)
        ran = trainer.cfg  # what the trainer ran (nothing "auto" left to resolve)
        peaks = memory_peaks(device)
        save_config(ran, Path(tmp) / "flux_gpucheck.json")
        planned = plan_json(Path(tmp) / "flux_gpucheck.json", transformer_json, gpu_mem_gib)
        trainer.logger.close()
    t = ran.train
    settings = (
        f"ZeRO-{ran.zero_stage}, checkpointing {'on' if ran.policy.gradient_checkpointing else 'off'}, "
        f"whole-model sampling {'on' if ran.whole_model_sampling is True else 'off'}, micro-batch "
        f"{t.minibatch_size} (rollout {t.rollout_batch_size}, {t.gradient_accumulation_steps} per step)"
    )
    # the plan's peak over the epoch's phases and the load phase, as the measured peaks cover the whole run
    plan_peak = max(planned["peak_gib_per_gpu"], planned["load_peak_gib_per_gpu"]) if planned else None
    note = (
        f"{n_params / 1e9:.2f} B params, {resolution} px, {images} images, LoRA r {lora_r}, bf16, 1 process, "
        f"{settings}"
    )
    rows = [row("flux", "images_per_s", m["perf/images_per_s"], "img/s", note)]
    rows.append(row("flux", "settings", settings, "", "the auto choice for this GPU (fastcps.plan.choose)"))
    for key, value in (
        ("zero_stage", ran.zero_stage),
        ("gradient_checkpointing", int(bool(ran.policy.gradient_checkpointing))),
        ("whole_model_sampling", int(ran.whole_model_sampling is True)),
        ("micro_batch", t.minibatch_size),
    ):
        rows.append(row("flux", key, value, "", "as the trainer ran it"))
    for key in ("epoch_s", "rollout_s", "reward_s", "recompute_s", "update_s"):
        rows.append(
            row(
                "flux",
                key,
                m[f"time/{key}"],
                "s",
                "update_s includes recompute_s" if key == "update_s" else "",
            )
        )
    both = (
        f"measured reserved {peaks['reserved']}, allocated {peaks['allocated']}, plan {plan_peak} GiB "
        f"(GPU {gpu_mem_gib} GiB; {settings})"
    )
    rows.append(
        row(
            "flux",
            "peak_reserved_gib",
            peaks["reserved"],
            "GiB",
            "torch.cuda.max_memory_reserved, whole run; " + both,
        )
    )
    rows.append(
        row(
            "flux",
            "peak_allocated_gib",
            peaks["allocated"],
            "GiB",
            "torch.cuda.max_memory_allocated, whole run",
        )
    )
    rows.append(
        row(
            "flux",
            "plan_peak_gib",
            plan_peak,
            "GiB",
            "python -m fastcps.plan --world-size 1, the settings run",
        )
    )
    if planned.get("headroom_gib") is not None:
        rows.append(
            row(
                "flux",
                "plan_headroom_gib",
                planned["headroom_gib"],
                "GiB",
                "GPU memory minus the plan's peak",
            )
        )
    # utilisation: the FLOPs of the trainer's own calls (fastcps.perf) over each phase's time, and the plan's
    # counted FLOPs of the same phases beside them (fastcps.plan.epoch): the first GPU run says how far the
    # trainer is from the hardware and whether the plan counts what the trainer does
    for key in ("rollout_tflops", "update_tflops", "tflops", "rollout_mfu", "update_mfu", "mfu"):
        if f"perf/{key}" in m:
            rows.append(
                row(
                    "flux",
                    key,
                    m[f"perf/{key}"],
                    "TFLOP/s" if key.endswith("tflops") else "fraction",
                    "counted FLOPs / phase wall time (fastcps.perf)",
                )
            )
    ph = planned.get("phase_flop") or {}
    if ph:
        update = sum(
            ph[k]
            for k in (
                "old log-prob recompute",
                "training forward",
                "training backward",
                "checkpoint re-forward",
                "KL reference forward",
            )
        )
        for key, flop in (("rollout", ph["rollout"]), ("update", update)):
            rows.append(
                row(
                    "flux",
                    f"plan_{key}_tflop",
                    flop / 1e12,
                    "TFLOP",
                    "the plan's counted epoch, world size 1",
                )
            )
            peak, mfu = peak_tflops(device) or planned["peak_tflops"], planned["mfu"]
            rows.append(
                row(
                    "flux",
                    f"plan_{key}_s",
                    flop / (peak * 1e12 * mfu),
                    "s",
                    f"the plan's projection at {mfu:.0%} of {peak:g} TFLOP/s; measured {key}_s beside it",
                )
            )
    return rows


def auto_settings(cfg: RunConfig, transformer_json: Path, gpu_mem_gib: float | None) -> RunConfig:
    """``cfg`` with its "auto" settings made as the trainer's ``resolve_auto`` makes them, but for the
    transformer of ``transformer_json`` (the one the check builds; the pipeline folder's is tiny) and a
    GPU of ``gpu_mem_gib`` (None: nothing to fit, the settings as written)."""
    from fastcps.plan import Loader, choose
    from fastcps.plan.choose import reserve_gib
    from fastcps.plan.costs import with_changes
    from fastcps.trainer import evaluate_with

    loader = Loader(cfg, transformer_json, evaluate=evaluate_with)
    limit = None
    if gpu_mem_gib is not None:
        limit = (gpu_mem_gib - reserve_gib(gpu_mem_gib, cfg.memory_reserve)) * 2**30
    chosen = choose(cfg, 1, loader, loader.model(cfg), limit)
    return with_changes(
        cfg,
        {
            "zero_stage": chosen["stage"],
            "policy.gradient_checkpointing": chosen["checkpointing"],
            "whole_model_sampling": chosen["whole_model_sampling"],
            **(chosen["changes"] or {"train.micro_batch": None}),
        },
    )


def memory_peaks(device: torch.device) -> dict:
    """The caching allocator's peaks since the process started, in GiB: what it reserved from the driver
    (what the plan's peak plus fragmentation must fit) and what tensors held; None off CUDA."""
    if device.type != "cuda":
        return {"reserved": None, "allocated": None}
    return {
        "reserved": torch.cuda.max_memory_reserved(device) / 2**30,
        "allocated": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def plan_json(config_path: Path, transformer_json: Path, gpu_mem_gib: float | None = None) -> dict:
    """The plan (``--json``) of a saved config at world size 1, or {} when the plan cannot say."""
    import contextlib
    import io

    from fastcps import plan
    from fastcps.trainer import evaluate_with

    argv = ["--config", str(config_path), "--world-size", "1", "--model-config", str(transformer_json)]
    if gpu_mem_gib is not None:
        argv += ["--gpu-mem", str(gpu_mem_gib)]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = plan.main([*argv, "--json"], evaluate=evaluate_with)
    except SystemExit as exc:  # argparse: this version of the plan lacks a flag
        rc = exc.code
    if rc != 0:
        return {}
    try:
        return json.loads(out.getvalue())
    except ValueError:
        return {}
