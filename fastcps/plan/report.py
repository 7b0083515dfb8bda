"""The human-readable table of ``python -m fastcps.plan`` (the numbers come from ``fastcps.plan.plan``)."""

from __future__ import annotations

from pathlib import Path

from fastcps.config import RunConfig
from fastcps.runtime import GIB


def gib(x: float) -> str:
    return f"{x / GIB:7.2f} GiB"


def tflop(x: float) -> str:
    return f"{x / 1e12:10.1f} TFLOP"


def anchor_lines(r: dict) -> list[str]:
    """What the plan's anchor recipe counts (``fastcps.policies.plan_facts.Anchor``), in two lines."""
    from fastcps.policies.plan_facts import Anchor

    a = Anchor(**r["anchor_recipe"])
    samples = "" if a.cfg == 1 else f", each on {a.cfg} samples (true CFG),"
    text = f"{a.text_tokens} text tokens" if a.text_tokens is not None else "the run's text tokens"
    ckpt = "activation checkpointing" if a.checkpointing else "no checkpointing"
    if a.reference_forwards:
        ckpt += f", {a.reference_forwards} KL reference forward per trained step"
    return [
        f"  anchor: {a.name} ({a.source}; {a.rollout_forwards} rollout forwards + {a.trained_steps} "
        f"trained steps{samples} per image,",
        f"  {text}, old log-probs from the rollout, {ckpt}, the same images per epoch; eval not counted)",
    ]


def report(cfg: RunConfig, r: dict, out) -> None:
    def p(line=""):
        print(line, file=out)

    s, pol = cfg.sampler, cfg.policy
    # the batch sizes the plan chose (train.micro_batch "auto" changes them), the rest as configured
    t = cfg.train.model_copy(
        update={
            "minibatch_size": r["micro_batch"],
            "rollout_batch_size": r["rollout_batch_size"],
            "gradient_accumulation_steps": r["gradient_accumulation_steps"],
        }
    )
    per_rank = r["images_per_rank"]
    world, c = r["world_size"], r["cfg_batch_multiplier"]
    tf = Path(r["files"]["transformer"]).absolute()
    tf = (
        tf.relative_to(Path.cwd()) if tf.is_relative_to(Path.cwd()) else tf
    )  # the same report on every machine
    p(
        f"fastcps plan: {cfg.name}  ({pol.name}, {pol.pretrained or 'no weights named'}; transformer config "
        f"{tf})"
    )
    how = "auto" if cfg.zero_stage == "auto" else ("zero_stage" if cfg.zero_stage else cfg.deepspeed_config)
    ck = "auto" if pol.gradient_checkpointing == "auto" else "set"
    p(
        f"world size {world}, ZeRO stage {r['zero_stage']} ({how}), gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'} ({ck}), whole-model sampling "
        f"{'on' if r['whole_model_sampling'] else 'off'} ({cfg.whole_model_sampling}), micro-batch "
        f"{r['micro_batch']} ({cfg.train.micro_batch})"
    )
    if r["whole_sampling_peak_gib"] is not None:
        peak = r["whole_sampling_peak_gib"]
        p(f"  with the whole transformer gathered while sampling: peak {peak:.1f} GiB per GPU")
    p()
    p("batch arithmetic")
    images = t.prompts_per_epoch * t.images_per_prompt
    p(
        f"  prompts per epoch           {t.prompts_per_epoch} groups x K = {t.images_per_prompt} images = "
        f"{images} images"
    )
    p(
        f"  per rank                    {per_rank} images = {per_rank // t.rollout_batch_size} rollout "
        "batches "
        f"of {t.rollout_batch_size}, {per_rank // t.minibatch_size} minibatches of {t.minibatch_size}"
    )
    p(
        f"  groups across ranks         a group of {t.images_per_prompt} spans up to "
        f"{min(t.images_per_prompt, world)} "
        f"ranks; advantages after an all-gather of {images} rewards"
    )
    lo, hi = r["trained_steps_range"]
    span = f"{lo}" if lo == hi else f"{lo}..{hi}, mean {r['trained_steps_per_image']:.2f}"
    p(
        f"  trained steps per image     {span} of {s.num_steps} ({s.name}, "
        f"{'SDE window ' + str(s.sde_window_size) if s.sde_window_size else 'every noisy step'}, "
        "timestep_fraction "
        f"{s.timestep_fraction}; fastcps.rollout.sampling_steps on the policy's sigmas)"
    )
    p(
        f"  gradient accumulation       {t.gradient_accumulation_steps} minibatches x {hi} steps = "
        f"{t.gradient_accumulation_steps * hi} micro-steps per optimizer step"
    )
    p(f"  optimizer steps per epoch   {r['optimizer_steps']} (num_inner_epochs {t.num_inner_epochs})")
    if c == 2:
        p("  true CFG                    every transformer call runs 2 x the images (policy.cfg_scale > 1)")

    p()
    p(
        f"transformer: {r['transformer_params'] / 1e9:.3f} B parameters, {r['trained_params'] / 1e6:.1f} M "
        "trained "
        f"({'LoRA r ' + str(pol.lora.r) if pol.lora else 'full fine-tuning'}); measured on fake tensors "
        "(fastcps.plan.measure: real architecture and dtype, no weights, no GPU)"
    )
    p(
        f"  FLOPs per image             forward {r['forward_flop_per_image'] / 1e12:.2f} T, backward "
        f"{r['backward_flop_per_image'] / 1e12:.2f} T (autograd on fake CPU tensors)"
    )
    a = r["activation_peak_bytes"]
    p(
        f"  activations, training micro-step of {t.minibatch_size * c} samples: {gib(a['train']).strip()} "
        "without, "
        f"{gib(a['train_checkpointed']).strip()} with gradient checkpointing (peak above the weights)"
    )
    p(
        f"  rollout forward of {t.rollout_batch_size * c} samples: {gib(a['rollout']).strip()};  VAE decode "
        "of "
        f"{min(4, t.rollout_batch_size)} images (fp32): {gib(a['vae_decode']).strip()}"
    )

    p()
    p(
        "calls per rank per epoch, counted on the trainer's own epoch functions (fastcps.plan.epoch: "
        "rollout_epoch,"
    )
    p("run_update, Trainer.evaluate; eval divided by eval.every)")
    for k, v in r["calls_per_rank"].items():
        p(f"  {k:56} {v:8.1f}")
    p()
    p(f"FLOPs per epoch, all {world} GPUs             {'this config':>16} {'anchor':>18}")
    an = r["anchor_phase_flop"]
    for k, v in r["phase_flop"].items():
        p(f"  {k:40} {tflop(v)} {tflop(an[k]) if k in an else ' ' * 16:>18}")
    p(f"  {'total':40} {tflop(r['epoch_flop'])} {tflop(r['anchor_epoch_flop']):>18}")
    for line in anchor_lines(r):
        p(line)
    p(f"  training epoch (without eval) / anchor: {r['anchor_ratio']:.3f}x")
    p(
        f"  projected epoch time: {r['projected_epoch_s']:.0f} s on {world} GPUs at {r['mfu']:.0%} of "
        f"{r['peak_tflops']:.0f} TFLOP/s -- a PROJECTION from FLOPs, not a measurement"
    )

    p()
    m2, m3 = r["memory"][2], r["memory"][3]
    p(
        f"memory per GPU at world size {world} (dtype {pol.dtype}, gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'})   {'ZeRO-2':>10} {'ZeRO-3':>11}"
    )
    keys = list(dict.fromkeys(list(m2["persistent"]) + list(m3["persistent"])))
    for k in keys:
        p(f"  {k:56} {gib(m2['persistent'].get(k, 0.0))} {gib(m3['persistent'].get(k, 0.0))}")
    for phase in m3["transients"]:
        for k in m3["transients"][phase]:
            p(
                f"  + {phase}: {k:36}"[:58].ljust(58) + f" {gib(m2['transients'][phase][k])} "
                f"{gib(m3['transients'][phase][k])}"
            )
    for phase in m3["phase_totals"]:
        p(f"  = {phase:54} {gib(m2['phase_totals'][phase])} {gib(m3['phase_totals'][phase])}")
    p(
        f"  peak (phase)                                             {gib(m2['peak'])} {gib(m3['peak'])}"
        f"   ({m2['peak_phase']} / {m3['peak_phase']})"
    )
    terms = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["load_phase"].items() if v and k != "peak")
    p(
        f"  load phase (ZeRO stage {r['zero_stage']}): peak {r['load_peak_gib_per_gpu']:.2f} GiB ({terms}; "
        "fastcps.plan.load)"
    )
    by = "  ".join(f"{k} {v:.1f}" for k, v in r["peak_gib_by_choice"].items())
    p(
        f"  peak by choice at micro-batch {t.minibatch_size} (GiB): {by}; plus the CUDA context, cuBLAS/NCCL "
        "workspaces and fragmentation (--reserve)"
    )
    if pol.offload_frozen:
        p("  text encoders on the CPU (policy.offload_frozen): moved in only to encode new prompts")

    p()
    p("ZeRO traffic per GPU per epoch (received; ring: (N-1)/N of each full tensor; the counted calls x the")
    p(
        "parameters each call fetches, module by module: fastcps.plan.measure.ModuleUses, checked against "
        "DeepSpeed's"
    )
    p(
        "own all-gathers in tests/test_zero3.py; a training run logs its real ones as "
        "zero/<phase>_gathered_gb)"
    )
    for k, z in r["zero_traffic_bytes_per_gpu"].items():
        p(
            f"  {k:32} parameter all-gather {z['parameter all-gather'] / 1e9:9.1f} GB ({z['gathers']:.1f} "
            "gathers), "
            f"gradient reduce-scatter {z['gradient reduce-scatter'] / 1e9:6.1f} GB"
        )

    p()
    files = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in r["checkpoint_files"].items() if v)
    p(f"one checkpoint, all ranks: {r['checkpoint_bytes'] / 1e9:.2f} GB ({files})")
    p(
        f"host memory a save holds at once (rank 0): {r['save_host_peak_bytes'] / 1e9:.2f} GB (one export "
        "shard, at most 5 GB, or the fp32 LoRA adapter, or the largest optimizer state torch.save copies)"
    )

    if "fits" in r:
        p()
        open_ = len(r["candidates"]) > 1
        p(
            "settings the config leaves open (auto): what fits first, cheapest first (FLOPs: checkpointing; "
            "ZeRO-2 before ZeRO-3; traffic; the largest micro-batch); the first is taken"
            if open_
            else "settings: as configured"
        )
        for cand in r["candidates"][:12]:
            fits = "fits" if cand["fits"] else "does not fit"
            p(
                f"  {cand['choice']:34} micro-batch {cand['micro_batch']:3}  peak {cand['peak_gib']:6.1f} "
                f"GiB  ZeRO traffic {cand['zero_traffic_gb']:8.1f} GB  {fits}"
            )
        if len(r["candidates"]) > 12:
            p(f"  ... {len(r['candidates']) - 12} more (--json: candidates)")
        res = r["reserve"]
        how = f"{res['fraction']:.0%} of it" if res["fraction"] else ""
        how += (" or " if how else "") + f"{res['gib']:g} GiB" if res["gib"] else ""
        head = (
            f"--gpu-mem {r['gpu_mem_gib']:g} GiB, {r['reserve_gib']:.2f} GiB kept free ({how or 'none'}; "
            "fastcps.plan.choose):"
        )
        peak = r["gpu_mem_gib"] - r["headroom_gib"]
        if r["fits"]:
            p(
                f"{head} fits (peak {peak:.2f} GiB, headroom {r['headroom_gib']:.2f} GiB = "
                f"{r['headroom_fraction']:.1%} of the GPU)"
            )
        else:
            sug = r["suggestion"]
            flags = " ".join(f"--set {f}" for f in sug["set"])
            verdict = "fits" if sug["fits"] else "still does not fit"
            p(f"{head} does NOT fit (peak {r['peak_gib_per_gpu']:.2f} GiB)")
            p(f"  smallest change found: {flags or '(none)'} -> peak {sug['peak_gib']:.2f} GiB, {verdict}")
