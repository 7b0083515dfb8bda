"""What a run will cost, before any weight loads: ``python -m fastcps.plan --config X.json --world-size 8``.

Prints the batch arithmetic, a per-GPU memory estimate under ZeRO-3 (LoRA vs full fine-tuning),
and the transformer forward/backward passes per epoch. The parameter count is exact: the
transformer is built on the ``meta`` device from its config (``configs/models/*.json``, copied from
the hub's ``transformer/config.json``; or ``<policy.pretrained>/transformer/config.json`` when that is
a local folder), and LoRA's count is summed over the Linear layers the targets match, as peft does.

Memory model (bytes per parameter, mixed precision with DeepSpeed's bf16 optimizer):
- frozen weights: 2 (bf16), partitioned over the ranks by ZeRO-3;
- trained weights: 2 (bf16 copy) + 2 (bf16 gradient) + 4 (fp32 master) + 8 (Adam m, v) = 16,
  partitioned; ZeRO-3 also gathers whole layers for each forward/backward (the "live" working set,
  at most ``stage3_max_live_parameters``, 1e9 by default, and at least the largest block);
- activations per sample of one training forward: ~34·s·h bytes per transformer block (s tokens,
  hidden h; Korthikanti et al. 2022, with memory-efficient attention so no s² term), or with
  gradient checkpointing 2·s·h per block (its input) plus one block's 34·s·h.
Activations do not shrink with LoRA: the gradient still flows through every block.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fastcps.config import RunConfig
from fastcps.configlib import ConfigError, load_config, validate_tree

MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"  # in the repo checkout
if not MODELS.is_dir():  # an installed package: the configs/ folder of the working directory
    MODELS = Path("configs") / "models"
GIB = 2**30
# Frozen components, for reference (published sizes, not built here): parameters in billions.
FROZEN = {
    "flux": {"T5-XXL encoder": 4.762, "CLIP-L text": 0.123, "VAE": 0.084},
    "sd3": {"T5-XXL encoder": 4.762, "CLIP-G text": 0.695, "CLIP-L text": 0.123, "VAE": 0.084},
}
ACT_PER_BLOCK = 34  # bytes per token per hidden unit of one block's saved activations (bf16)


def model_config_path(cfg: RunConfig) -> Path:
    local = Path(cfg.policy.pretrained) / "transformer" / "config.json"
    if cfg.policy.pretrained and local.is_file():
        return local
    name = cfg.policy.pretrained.lower()
    if cfg.policy.name == "flux":
        return MODELS / ("flux1-schnell_transformer.json" if "schnell" in name else "flux1-dev_transformer.json")
    if cfg.policy.name == "sd3":
        if "large" in name:
            raise ConfigError(f"no shipped transformer config for {cfg.policy.pretrained!r}; pass --model-config")
        return MODELS / "sd3.5-medium_transformer.json"
    raise ConfigError(f"policy.name = {cfg.policy.name!r}: the plan covers flux and sd3")


def build_meta(name: str, config: dict):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if name == "flux" else SD3Transformer2DModel
    with torch.device("meta"):  # shapes only: no memory, no weights
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def lora_params(model, targets: list[str], r: int) -> tuple[int, int]:
    """(LoRA parameters, adapted Linear layers) for peft's suffix match of ``targets``."""
    import torch

    n = layers = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += r * (mod.in_features + mod.out_features)
            layers += 1
    return n, layers


def gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def plan(cfg: RunConfig, world: int, model_config: Path | None = None, out=sys.stdout) -> dict:
    from fastcps.rollout import plan_steps
    from fastcps.schedule import flow_sigmas

    def p(line=""):
        print(line, file=out)

    t, s, pol = cfg.train, cfg.sampler, cfg.policy
    path = model_config or model_config_path(cfg)
    mc = json.loads(Path(path).read_text())
    model = build_meta(pol.name, mc)
    n_params = sum(q.numel() for q in model.parameters())

    # --- batch arithmetic -----------------------------------------------------------------------
    images = t.prompts_per_epoch * t.images_per_prompt
    per_rank = images // world
    rollout_batches = per_rank // t.rollout_batch_size
    minibatches = per_rank // t.minibatch_size
    opt_steps = t.num_inner_epochs * minibatches // t.gradient_accumulation_steps
    # trained steps: the sampler's noisy steps in the SDE window (timestep_fraction of them)
    sig = flow_sigmas(s.num_steps, shift=3.0)
    win = s.sde_window_size
    n_trained = len(plan_steps(s.name, s.eta, sig, timestep_fraction=s.timestep_fraction, window_size=win,
                               window_start=0, logprob=s.logprob).trained)
    micro_per_opt = t.gradient_accumulation_steps * n_trained
    p(f"fastcps plan: {cfg.name}  ({pol.name}, {pol.pretrained or 'no weights named'}; transformer config {path})")
    p(f"world size {world}")
    p()
    p("batch arithmetic")
    p(f"  prompts per epoch           {t.prompts_per_epoch} groups x K = {t.images_per_prompt} images = {images} images")
    p(f"  per rank                    {per_rank} images = {rollout_batches} rollout batches of {t.rollout_batch_size}"
      f", {minibatches} minibatches of {t.minibatch_size}")
    span = min(t.images_per_prompt, world)
    p(f"  groups across ranks         the {images} slots are shuffled over {world} ranks: a group of "
      f"{t.images_per_prompt} spans up to {span} ranks; advantages are computed after an all-gather of "
      f"{images} rewards")
    p(f"  trained steps per image     {n_trained} of {s.num_steps} ({s.name}, "
      f"{'SDE window ' + str(win) if win else 'every noisy step'}, timestep_fraction {s.timestep_fraction})")
    p(f"  gradient accumulation       {t.gradient_accumulation_steps} minibatches x {n_trained} steps = "
      f"{micro_per_opt} micro-steps per optimizer step")
    p(f"  optimizer steps per epoch   {opt_steps} (num_inner_epochs {t.num_inner_epochs}); samples per "
      f"optimizer step {t.minibatch_size * t.gradient_accumulation_steps * world} images x {n_trained} steps")

    # --- passes per epoch --------------------------------------------------------------------------
    cfg_mult = 2 if (pol.name == "sd3" and pol.cfg_scale and pol.cfg_scale > 1) else 1
    roll_fwd = per_rank * s.num_steps * cfg_mult
    old_fwd = per_rank * n_trained * cfg_mult if t.old_logprob == "recompute" else 0
    train_fb = t.num_inner_epochs * per_rank * n_trained * cfg_mult
    ref_fwd = train_fb if t.beta_kl > 0 else 0
    recompute = train_fb if pol.gradient_checkpointing else 0
    e = cfg.eval
    eval_fwd = 0.0
    if e.every:
        eval_fwd = math.ceil(e.num_prompts / world) * e.images_per_prompt * (e.num_steps or s.num_steps) * cfg_mult / e.every
    p()
    p("transformer passes per epoch, per rank (sample-passes: one image through the transformer once"
      + ("; true CFG doubles each" if cfg_mult == 2 else "") + ")")
    p(f"  rollout forwards (no grad)          {roll_fwd:>8}  = {per_rank} images x {s.num_steps} steps"
      f" in {rollout_batches * s.num_steps} calls")
    p(f"  old log-prob forwards (no grad)     {old_fwd:>8}  (old_logprob = {t.old_logprob})")
    p(f"  training forwards + backwards       {train_fb:>8}  in {t.num_inner_epochs * minibatches * n_trained} calls")
    p(f"  gradient-checkpoint re-forwards     {recompute:>8}")
    p(f"  reference forwards (beta_kl > 0)    {ref_fwd:>8}")
    p(f"  eval forwards (amortised)           {eval_fwd:>8.1f}  every {e.every} epochs")
    total_fwd = roll_fwd + old_fwd + train_fb + recompute + ref_fwd + eval_fwd
    p(f"  total: {total_fwd:.0f} forwards and {train_fb} backwards per rank; x{world} ranks = "
      f"{total_fwd * world:.0f} / {train_fb * world}")

    # --- memory -----------------------------------------------------------------------------------
    if pol.name == "flux":
        h = mc["num_attention_heads"] * mc["attention_head_dim"]
        img_tokens = (pol.resolution // 16) ** 2
        txt_tokens = pol.max_sequence_length
        blocks = mc["num_layers"] + mc["num_single_layers"]
    else:
        h = mc["num_attention_heads"] * mc["attention_head_dim"]
        img_tokens = (pol.resolution // 8 // mc["patch_size"]) ** 2
        txt_tokens = 77 + pol.max_sequence_length
        blocks = mc["num_layers"] + len(mc.get("dual_attention_layers") or [])  # dual: a second attention
    tokens = img_tokens + txt_tokens
    act_block = ACT_PER_BLOCK * tokens * h
    act_full = act_block * blocks
    act_ckpt = 2 * tokens * h * blocks + act_block
    act_sample = act_ckpt if pol.gradient_checkpointing else act_full
    mb = t.minibatch_size * cfg_mult
    largest = max(sum(q.numel() for q in blk.parameters()) for name, blk in model.named_modules()
                  if name.count(".") == 1 and name.split(".")[0].endswith("blocks"))
    live = max(largest, min(n_params, 10**9))
    if pol.name == "sd3":
        from fastcps.policies.sd3 import SD3Policy as cls
    else:
        from fastcps.policies.flux import FluxPolicy as cls
    targets = list(pol.lora.target_modules) if pol.lora and pol.lora.target_modules else list(cls.default_lora_targets)
    r = pol.lora.r if pol.lora else 64
    n_lora, n_layers = lora_params(model, targets, r)
    wbytes = 2 if pol.dtype in ("bf16", "fp16") else 4
    lora_mem = {"frozen weights (partition)": wbytes * n_params / world, "trained weights (partition)": wbytes * n_lora / world,
                "gradients (partition)": wbytes * n_lora / world, "optimizer fp32 master+Adam (partition)": 12 * n_lora / world}
    full_mem = {"frozen weights (partition)": 0.0, "trained weights (partition)": wbytes * n_params / world,
                "gradients (partition)": wbytes * n_params / world,
                "optimizer fp32 master+Adam (partition)": 12 * n_params / world}
    shared = {"gathered live parameters (ZeRO-3)": wbytes * live,
              f"activations, {mb} samples x {tokens} tokens": act_sample * mb}
    p()
    p(f"transformer: {n_params / 1e9:.3f} B parameters ({blocks} blocks, hidden {h}; built on the meta device)")
    p(f"LoRA r {r}, alpha {pol.lora.alpha if pol.lora else 2 * r:g}: {n_lora / 1e6:.1f} M parameters in {n_layers} "
      f"Linear layers ({', '.join(targets)})")
    p(f"tokens per sample: {img_tokens} image + {txt_tokens} text; activations per sample "
      f"{gib(act_full).strip()} without, {gib(act_ckpt).strip()} with gradient checkpointing "
      f"(policy.gradient_checkpointing = {str(pol.gradient_checkpointing).lower()})")
    p()
    p(f"memory per GPU under ZeRO-3 at world size {world} (dtype {pol.dtype}), training step:")
    p(f"  {'':42} {'LoRA':>12} {'full FT':>12}")
    tot = {"lora": 0.0, "full": 0.0}
    for k in lora_mem:
        p(f"  {k:42} {gib(lora_mem[k]):>12} {gib(full_mem[k]):>12}")
        tot["lora"] += lora_mem[k]
        tot["full"] += full_mem[k]
    for k, v in shared.items():
        p(f"  {k:42} {gib(v):>12} {gib(v):>12}")
        tot["lora"] += v
        tot["full"] += v
    frozen = FROZEN[pol.name]
    vae = frozen["VAE"] * 1e9 * wbytes
    enc = sum(v for k, v in frozen.items() if k != "VAE") * 1e9 * wbytes
    p(f"  {'VAE (frozen, on GPU)':42} {gib(vae):>12} {gib(vae):>12}")
    tot["lora"] += vae
    tot["full"] += vae
    if pol.offload_frozen:
        p(f"  {'text encoders (frozen)':42} {'on CPU':>12} {'on CPU':>12}   ({gib(enc).strip()} of host memory, "
          "policy.offload_frozen)")
    else:
        p(f"  {'text encoders (frozen, on GPU)':42} {gib(enc):>12} {gib(enc):>12}")
        tot["lora"] += enc
        tot["full"] += enc
    p(f"  {'total (before reward models, CUDA context)':42} {gib(tot['lora']):>12} {gib(tot['full']):>12}")
    ref_note = ("adapters off: no extra memory" if pol.lora else
                f"full FT loads a second frozen copy: +{gib(wbytes * n_params).strip()} (unpartitioned)")
    p(f"  reference policy (beta_kl = {t.beta_kl:g}): {ref_note if t.beta_kl > 0 else 'not used'}")
    emb = txt_tokens * mc["joint_attention_dim"] * wbytes
    seen = t.num_epochs * t.prompts_per_epoch
    try:
        from fastcps.prompts import load_prompts

        seen = min(seen, len(load_prompts(cfg.prompts.source)[0]))
    except (OSError, ValueError):
        pass
    p(f"  cached prompt embeddings: {emb / 2**20:.1f} MiB per distinct prompt, kept for the run on the policy's "
      f"device (the trainer caches every prompt): up to {seen} prompts = {gib(seen * emb).strip()} per GPU")
    p(f"  full FT - LoRA difference: {gib(tot['full'] - tot['lora']).strip()} per GPU "
      f"({16 if wbytes == 2 else 20} bytes/parameter of optimizer state + gradients, partitioned over {world})")
    return {"params": n_params, "lora_params": n_lora, "per_rank": per_rank, "optimizer_steps": opt_steps,
            "trained_steps": n_trained, "forwards": total_fwd, "backwards": train_fb,
            "memory_lora": tot["lora"], "memory_full": tot["full"], "activations_per_sample": act_sample}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Batch arithmetic, memory and passes of a run (loads no weights)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model-config", help="transformer config.json (default: configs/models/ by policy)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        validate_tree(cfg, world_size=args.world_size)
        plan(cfg, args.world_size, Path(args.model_config) if args.model_config else None)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
