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
from fastcps.config import LoraConfig, RunConfig, load_config, save_config

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
) -> list[dict]:
    """configs/flux_pickscore.json's recipe on one process under ZeRO-3 (bf16, LoRA r 64, gradient
    checkpointing, CPS with a 3-step SDE window of 6 steps, recompute) with the transformer of
    ``model_config`` (default: FLUX.1-dev's, 11.9 B parameters) in random weights, tiny text
    encoders of the real widths, a tiny VAE and the jpeg_compressibility reward: one warm-up epoch,
    then one measured epoch: images/s, the epoch split, peak memory beside the plan's prediction."""
    from fastcps.perf import peak_tflops
    from fastcps.policies import build_policy
    from fastcps.testing import save_tiny_flux

    if model_config is None:
        model_config = json.loads((CONFIGS / "models" / "flux1-dev_transformer.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_flux(Path(tmp) / "flux", t5_dim=text_dims[0], clip_dim=text_dims[1])
        per_prompt = 8
        sets = [
            f"policy.pretrained={folder}",
            "policy.offload_frozen=false",
            "policy.lora=null",
            f"policy.resolution={resolution}",
            f"policy.max_sequence_length={max_sequence_length}",
            'rewards=[{"name": "jpeg_compressibility"}]',
            f"train.prompts_per_epoch={images // per_prompt}",
            f"train.images_per_prompt={per_prompt}",
            "train.rollout_batch_size=8",
            "train.minibatch_size=4",
            "train.gradient_accumulation_steps=2",
            "train.num_epochs=2",
            "eval.every=0",
            "log.progress=false",
            # explicit: "auto" would plan the tiny transformer of the folder, not build_big_flux's
            "zero_stage=3",
            "log.images_every=0",
            "checkpoint.every=0",
            f"output_dir={tmp}",
            f"deepspeed_config={CONFIGS / 'ds_zero3.json'}",
            f"prompts.source={CONFIGS / 'prompts' / 'pickscore.txt'}",
        ]
        cfg = load_config(RunConfig, str(CONFIGS / "flux_pickscore.json"), sets)
        policy = build_policy(cfg.policy, device)  # tiny transformer, replaced next
        policy.transformer = build_big_flux(model_config, device).train()
        policy.transformer.enable_gradient_checkpointing()
        policy.add_lora(lora_r, 2.0 * lora_r)
        cfg.policy.lora, cfg.policy.gradient_checkpointing = LoraConfig(r=lora_r, alpha=2.0 * lora_r), True
        n_params = sum(p.numel() for p in policy.transformer.parameters())
        trainer = _trainer(cfg, Path(tmp) / "flux", policy=policy)
        trainer.run_epoch(0)  # warm-up: kernel compilation, allocator, DeepSpeed buffers
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        m = trainer.run_epoch(1)
        save_config(cfg, Path(tmp) / "flux_gpucheck.json")
        planned = plan_json(Path(tmp) / "flux_gpucheck.json", model_config)
        trainer.logger.close()
    predicted = planned.get("peak_gib_per_gpu")
    note = (
        f"{n_params / 1e9:.2f} B params, {resolution} px, {images} images, LoRA r {lora_r}, bf16, ckpt, "
        "ZeRO-3, 1 process"
    )
    rows = [row("flux", "images_per_s", m["perf/images_per_s"], "img/s", note)]
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
    rows.append(
        row(
            "flux", "peak_gib", m["memory/peak_gib"], "GiB", "torch.cuda.max_memory_allocated, measured epoch"
        )
    )
    rows.append(
        row("flux", "plan_peak_gib", predicted, "GiB", "python -m fastcps.plan --world-size 1, same settings")
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


def plan_json(config_path: Path, model_config: dict) -> dict:
    """The plan (``--json``) of a saved config at world size 1, or {} when the plan cannot say."""
    import contextlib
    import io

    from fastcps import plan

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(model_config, f)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = plan.main(
                ["--config", str(config_path), "--world-size", "1", "--model-config", f.name, "--json"]
            )
    except SystemExit as exc:  # argparse: this version of the plan lacks a flag
        rc = exc.code
    finally:
        Path(f.name).unlink()
    if rc != 0:
        return {}
    try:
        return json.loads(out.getvalue())
    except ValueError:
        return {}
