"""The human-readable table of ``python -m fastcps.plan`` (the numbers come from ``fastcps.plan.plan``)."""

from __future__ import annotations

from fastcps.config import RunConfig

GIB = 2**30


def gib(x: float) -> str:
    return f"{x / GIB:7.2f} GiB"


def tflop(x: float) -> str:
    return f"{x / 1e12:10.1f} TFLOP"


def report(cfg: RunConfig, r: dict, out) -> None:
    def p(line=""):
        print(line, file=out)

    t, s, pol, n = cfg.train, cfg.sampler, cfg.policy, r["passes"]
    world, c = r["world_size"], r["cfg_batch_multiplier"]
    p(f"fastcps plan: {cfg.name}  ({pol.name}, {pol.pretrained or 'no weights named'}; transformer config "
      f"{r['files']['transformer']})")
    p(f"world size {world}, ZeRO stage {r['zero_stage']} ({cfg.deepspeed_config})")
    p()
    p("batch arithmetic")
    images = t.prompts_per_epoch * t.images_per_prompt
    p(f"  prompts per epoch           {t.prompts_per_epoch} groups x K = {t.images_per_prompt} images = {images} images")
    p(f"  per rank                    {n['per_rank']} images = {n['per_rank'] // t.rollout_batch_size} rollout batches "
      f"of {t.rollout_batch_size}, {n['minibatches']} minibatches of {t.minibatch_size}")
    p(f"  groups across ranks         a group of {t.images_per_prompt} spans up to {min(t.images_per_prompt, world)} "
      f"ranks; advantages after an all-gather of {images} rewards")
    lo, hi = r["trained_steps_range"]
    span = f"{lo}" if lo == hi else f"{lo}..{hi}, mean {r['trained_steps_per_image']:.2f}"
    p(f"  trained steps per image     {span} of {s.num_steps} ({s.name}, "
      f"{'SDE window ' + str(s.sde_window_size) if s.sde_window_size else 'every noisy step'}, timestep_fraction "
      f"{s.timestep_fraction}; fastcps.rollout.plan_steps on the policy's sigmas)")
    p(f"  gradient accumulation       {t.gradient_accumulation_steps} minibatches x {hi} steps = "
      f"{t.gradient_accumulation_steps * hi} micro-steps per optimizer step")
    p(f"  optimizer steps per epoch   {r['optimizer_steps']} (num_inner_epochs {t.num_inner_epochs})")
    if c == 2:
        p("  true CFG                    every transformer call runs 2 x the images (policy.cfg_scale > 1)")

    p()
    p(f"transformer: {r['transformer_params'] / 1e9:.3f} B parameters, {r['trained_params'] / 1e6:.1f} M trained "
      f"({'LoRA r ' + str(pol.lora.r) if pol.lora else 'full fine-tuning'}); measured on fake tensors "
      "(fastcps.measure: real architecture and dtype, no weights, no GPU)")
    p(f"  FLOPs per image             forward {r['forward_flop_per_image'] / 1e12:.2f} T, backward "
      f"{r['backward_flop_per_image'] / 1e12:.2f} T (measured: {r['backward']}), checkpoint re-forward "
      f"{r['recompute_flop_per_image'] / 1e12:.2f} T")
    a = r["activation_peak_bytes"]
    p(f"  activations, training micro-step of {t.minibatch_size * c} samples: {gib(a['train']).strip()} without, "
      f"{gib(a['train_checkpointed']).strip()} with gradient checkpointing (peak above the weights)")
    p(f"  rollout forward of {t.rollout_batch_size * c} samples: {gib(a['rollout']).strip()};  VAE decode of "
      f"{min(4, t.rollout_batch_size)} images: {gib(a['vae_decode']).strip()}")

    p()
    p(f"FLOPs per epoch, all {world} GPUs             {'this config':>16} {'flow_grpo recipe':>18}")
    fg = r["flow_grpo_phase_flop"]
    for k, v in r["phase_flop"].items():
        p(f"  {k:40} {tflop(v)} {tflop(fg[k]) if k in fg else ' ' * 16:>18}")
    p(f"  {'total':40} {tflop(r['epoch_flop'])} {tflop(r['flow_grpo_epoch_flop']):>18}")
    p(f"  flow_grpo recipe: the same images, steps, forward and beta_kl; it trains the first int({s.num_steps} x "
      f"0.99) = {int(s.num_steps * 0.99)} steps of each image (its FLUX.1-dev recipe: 5 of 6; SD3.5: 9 of 10), "
      "old log-probs from the rollout, no gradient checkpointing; eval not counted")
    p(f"  projected epoch time: {r['projected_epoch_s']:.0f} s on {world} GPUs at {r['mfu']:.0%} of "
      f"{r['peak_tflops']:.0f} TFLOP/s (flow_grpo recipe {r['flow_grpo_projected_epoch_s']:.0f} s) -- a "
      "PROJECTION from FLOPs, not a measurement")

    p()
    m2, m3 = r["memory"][2], r["memory"][3]
    p(f"memory per GPU at world size {world} (dtype {pol.dtype}, gradient checkpointing "
      f"{str(pol.gradient_checkpointing).lower()})   {'ZeRO-2':>10} {'ZeRO-3':>11}")
    keys = list(dict.fromkeys(list(m2["persistent"]) + list(m3["persistent"])))
    for k in keys:
        p(f"  {k:56} {gib(m2['persistent'].get(k, 0.0))} {gib(m3['persistent'].get(k, 0.0))}")
    for phase in m3["transients"]:
        for k in m3["transients"][phase]:
            p(f"  + {phase}: {k:36}"[:58].ljust(58) + f" {gib(m2['transients'][phase][k])} "
              f"{gib(m3['transients'][phase][k])}")
    for phase in m3["phase_totals"]:
        p(f"  = {phase:54} {gib(m2['phase_totals'][phase])} {gib(m3['phase_totals'][phase])}")
    p(f"  peak (phase)                                             {gib(m2['peak'])} {gib(m3['peak'])}"
      f"   ({m2['peak_phase']} / {m3['peak_phase']})")
    p(f"  at ZeRO stage {r['zero_stage']}: {r['peak_gib_with_checkpointing']:.2f} GiB with, "
      f"{r['peak_gib_without_checkpointing']:.2f} GiB without gradient checkpointing; plus the CUDA context, "
      "NCCL buffers and fragmentation (not modeled)")
    if pol.offload_frozen:
        p("  text encoders on the CPU (policy.offload_frozen): moved in only to encode new prompts")

    z = r["zero_traffic_bytes_per_gpu"]
    p()
    p("ZeRO traffic per GPU per epoch (received; ring collectives move (N-1)/N of each full tensor)")
    p(f"  ZeRO-3: {z['zero3_gathers']:.0f} parameter all-gathers (each forward call, each backward, each "
      f"checkpoint re-forward) x {z['gathered_params'] / 1e9:.2f} B params x {z['bytes_per_param']} bytes x "
      f"{world - 1}/{world} = "
      f"{z['zero3_allgather'] / 1e9:.0f} GB, + gradient reduce-scatter {z['zero3_reduce_scatter'] / 1e9:.1f} GB")
    p(f"  ZeRO-2: gradient reduce-scatter {z['zero2_reduce_scatter'] / 1e9:.1f} GB + all-gather of the updated "
      f"trained weights per optimizer step {z['zero2_allgather'] / 1e9:.2f} GB = {z['zero2_total'] / 1e9:.1f} GB")

    if "fits" in r:
        p()
        head = f"--gpu-mem {r['gpu_mem_gib']:g} GiB (minus --reserve {r['reserve_gib']:g} GiB):"
        if r["fits"]:
            p(f"{head} fits (peak {r['peak_gib_per_gpu']:.2f} GiB)")
        else:
            sug = r["suggestion"]
            flags = " ".join(f"--set {f}" for f in sug["set"])
            verdict = "fits" if sug["fits"] else "still does not fit"
            p(f"{head} does NOT fit (peak {r['peak_gib_per_gpu']:.2f} GiB)")
            p(f"  smallest change found: {flags or '(none)'} -> peak {sug['peak_gib']:.2f} GiB, {verdict}")
