"""The cost model behind ``python -m fastcps.plan``: memory per GPU per phase and ZeRO stage, one
checkpoint's files, and the changes that make a config fit, from a RunConfig and the transformer's
measurements (``fastcps.plan.measure``). The epoch's calls, FLOPs and ZeRO traffic: ``fastcps.plan.epoch``.

Everything the transformer does is measured on fake tensors (FLOPs per sample, peak activation
bytes of a training micro-step with and without gradient checkpointing, of a no-grad forward, of a
VAE decode). What is not measured is counted from its size: the ZeRO partitions and buffers
(DeepSpeed's formulas and defaults), the frozen models (published parameter counts), the rollout's
buffers. Terms and formulas are listed in ``persistent`` and ``transients``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from fastcps.config import RunConfig

BYTES = {
    "bf16": 2,
    "fp16": 2,
    "fp32": 4,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "amp": 4,
}  # a reward's "amp": fp32 weights, fp16 autocast (fastcps.rewards._util)
# The VAE in fp32, weights and decode, as flow_grpo keeps it (scripts/train_sd3.py:410,
# ``pipeline.vae.to(accelerator.device, dtype=torch.float32)``) and the policies decode.
VAE_DTYPE = "fp32"
DECODE_CHUNK = 4  # images per VAE decode call (DiffusersPolicy.decode_chunk)
# Rewards on the training GPU (fastcps/rewards/*), billions of parameters per model: PickScore and HPSv2
# are CLIP ViT-H-14 (986 M); aesthetic and image_similarity a CLIP ViT-L/14 (428 M; aesthetic + a small
# MLP); geneval's in-process detector (detector: mask2former) Mask2Former Swin-S (68.7 M) and its colour
# classifier open_clip ViT-L-14 (427.6 M). None on a training GPU: ocr (the CPU), geneval with a detection
# server, vlm_judge (its chat endpoint), remote (its reward service: python -m fastcps.rewards.serve).
REWARD_PARAMS = {
    "pickscore": {"dtype": 0.986},
    "hpsv2": {"dtype": 0.986},
    "aesthetic": {"dtype": 0.428},
    "image_similarity": {"dtype": 0.428},
    "geneval": {"dtype": 0.0687, "clip_dtype": 0.4276},  # each part in its own dtype argument
    "remote": {},
    "vlm_judge": {},
}
REWARD_DTYPE_DEFAULTS = {"dtype": "float32", "clip_dtype": "amp"}  # amp: fp32 weights, fp16 autocast


def reward_model_bytes(rewards) -> float:
    """Bytes of reward models each training GPU holds, for the config's ``rewards``: each model part in
    the dtype its argument gives (the rewards' defaults otherwise)."""
    total = 0.0
    for r in rewards:
        if r.name == "geneval" and r.args.get("detector", "mask2former") != "mask2former":
            continue  # detections come from a server or the metadata
        for key, billions in REWARD_PARAMS.get(r.name, {}).items():
            dtype = str(r.args.get(key, REWARD_DTYPE_DEFAULTS[key]))
            total += billions * 1e9 * (4 if dtype == "amp" else BYTES[dtype])
    return total


@dataclass
class Model:
    """What the cost model needs of the transformer and its surroundings (sizes in elements)."""

    family: str
    params: int  # all transformer parameters, LoRA included
    trained: int
    small: int  # parameters of tensors below ZeRO-3's persistence threshold (never partitioned)
    largest_fetch: int  # the largest module's own parameters: what ZeRO-3 gathers at once
    text_tokens: int
    joint_dim: int
    pooled_dim: int
    latent_numel: int
    vae_params: int
    meter: object = None  # fastcps.plan.measure.TransformerMeter
    vae_peak: object = None  # batch -> peak bytes of a VAE decode
    vae_flop: object = None  # batch -> FLOPs of a VAE decode
    meter_lora: tuple | None = None  # the LoRA (r, alpha, targets) the meter was built with
    meter_threshold: int = 0  # ZeRO-3's persistence threshold behind ``small`` (tensors below it stay whole)
    sigmas: object = None  # num_steps -> the policy's sigma schedule
    text_encoder_params: float | None = None  # all text encoders; None: the published sizes (facts)
    counted: dict = field(default_factory=dict)  # the epochs counted for this model (epoch.counted_epoch)
    evaluate: object = None  # the trainer's eval on given parts (fastcps.trainer.evaluate_with)
    facts: object = None  # the family's fastcps.policies.plan_facts.FamilyPlan


@dataclass
class Zero:
    """The DeepSpeed ZeRO settings that size buffers, DeepSpeed's defaults filled in."""

    stage: int
    reduce_bucket_size: int
    contiguous_gradients: bool
    overlap_comm: bool
    prefetch_bucket_size: int
    max_live_parameters: int
    param_persistence_threshold: int
    sub_group_size: int
    offload_optimizer: bool = False
    extra: dict = field(default_factory=dict)


def zero_settings(zero_section: dict, stage: int | None = None) -> Zero:
    """``zero_optimization`` of a DeepSpeed JSON through DeepSpeed's own config class (its defaults)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed logs its accelerator choice to stdout
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    section = dict(zero_section)
    if stage is not None:
        section["stage"] = stage
        if "overlap_comm" not in zero_section:
            section.pop("overlap_comm", None)
    z = DeepSpeedZeroConfig(**section)
    off = z.offload_optimizer is not None and str(getattr(z.offload_optimizer, "device", "none")).endswith(
        "cpu"
    )
    return Zero(
        int(z.stage),
        int(z.reduce_bucket_size),
        bool(z.contiguous_gradients),
        bool(z.overlap_comm),
        int(z.prefetch_bucket_size),
        int(z.max_live_parameters),
        int(z.param_persistence_threshold),
        int(z.sub_group_size),
        off,
    )


def cfg_mult(cfg: RunConfig) -> int:
    """Transformer samples per image: true CFG (a family with ``FamilyPlan.true_cfg``, cfg_scale > 1)
    runs every velocity on 2B."""
    from fastcps.policies.families import family

    p = cfg.policy
    true_cfg = family(p.name).plan_facts().true_cfg
    return 2 if true_cfg and p.cfg_scale is not None and p.cfg_scale > 1 else 1


def trained_steps(cfg: RunConfig, sigmas) -> list[int]:
    """Trained steps per image for every SDE-window start the trainer can draw (``Trainer._plan``:
    uniform over ``sde_window_range``), from ``fastcps.rollout.sampling_steps`` on the policy's sigmas."""
    from fastcps.rollout import sampling_steps

    s = cfg.sampler
    starts = [0]
    if s.sde_window_size is not None:
        lo, hi = s.sde_window_range or (0, s.num_steps - s.sde_window_size + 1)
        starts = list(range(lo, hi))
    return [
        len(
            sampling_steps(
                s.name,
                s.eta,
                sigmas,
                timestep_fraction=s.timestep_fraction,
                window_size=s.sde_window_size,
                window_start=w,
                logprob=s.logprob,
            ).trained
        )
        for w in starts
    ]


def grad_bytes(cfg: RunConfig, zero: Zero) -> int:
    """Bytes per gradient element in the accumulated partition and the reduction: the trainer sets fp32
    for a bf16/fp16 model under ZeRO-2/3 (``fastcps.engine.deepspeed_config``: data_types.grad_accum_dtype,
    communication_data_type; a DeepSpeed JSON that sets them itself is not read here)."""
    wb = BYTES[cfg.policy.dtype]
    return 4 if wb == 2 and zero.stage in (2, 3) else wb


def persistent(cfg: RunConfig, world: int, model: Model, zero: Zero, n_trained_max: int) -> dict:
    """Bytes per GPU held for the whole epoch (ZeRO partitions, frozen models, rollout buffers)."""
    p, t, n = cfg.policy, cfg.train, world
    wb = BYTES[p.dtype]
    full_ft_ref = p.lora is None and t.beta_kl > 0
    out = {}
    # ZeRO-3 partitions them (tensors below the persistence threshold stay whole on every rank);
    # ZeRO-2 keeps a full copy on every rank
    out["transformer weights"] = (
        wb * ((model.params - model.small) / n + model.small) if zero.stage >= 3 else wb * model.params
    )
    gb = grad_bytes(cfg, zero)
    out[f"gradients (partition, {'fp32' if gb == 4 else p.dtype})"] = gb * model.trained / n
    buckets = 2 if zero.overlap_comm and zero.stage < 3 else 1  # ZeRO-2 double-buffers with overlap_comm
    out["gradient reduce bucket"] = gb * (
        zero.reduce_bucket_size * buckets
        if zero.contiguous_gradients
        else min(zero.reduce_bucket_size, model.trained)
    )
    out["fp32 master + Adam m, v (partition)"] = 0.0 if zero.offload_optimizer else 12 * model.trained / n
    out[f"VAE ({VAE_DTYPE})"] = BYTES[VAE_DTYPE] * model.vae_params
    out["text encoders"] = 0.0 if p.offload_frozen else text_encoder_bytes(cfg, model)
    out["reward models"] = reward_model_bytes(cfg.rewards)
    out["KL reference (frozen copy)"] = wb * model.params if full_ft_ref else 0.0
    per_rank = t.prompts_per_epoch * t.images_per_prompt // n
    out["rollout buffers (x_t, x_next fp32, log-probs)"] = (
        per_rank * n_trained_max * (2 * model.latent_numel * 4 + 8)
    )
    distinct = min(t.prompts_per_epoch, per_rank) + (1 if cfg_mult(cfg) == 2 else 0)  # + the negative prompt
    out["prompt encodings of the epoch"] = (
        distinct * (model.text_tokens * model.joint_dim + model.pooled_dim) * wb
    )
    return out


def text_encoder_bytes(cfg: RunConfig, model: Model) -> float:
    """The policy's text encoders in its dtype: counted from a local pipeline folder's files when the
    plan has them (``Model.text_encoder_params``), else the family's published sizes."""
    n = model.text_encoder_params
    if n is None:
        n = sum(model.facts.text_encoders.values()) * 1e9
    return n * BYTES[cfg.policy.dtype]


def live_gathered(cfg: RunConfig, model: Model, zero: Zero) -> float:
    """ZeRO-3's gathered working set: the running module's parameters plus the prefetch bucket,
    capped by stage3_max_live_parameters."""
    if zero.stage < 3:
        return 0.0
    return BYTES[cfg.policy.dtype] * min(
        zero.max_live_parameters, model.largest_fetch + zero.prefetch_bucket_size
    )


def transients(cfg: RunConfig, world: int, model: Model, zero: Zero, batches: dict) -> dict:
    """Bytes per GPU on top of ``persistent`` in each phase the trainer runs (measured activations + ZeRO-3
    gathers), at the call sizes of ``fastcps.plan.epoch.call_batches``."""
    t, p = cfg.train, cfg.policy
    gathered = live_gathered(cfg, model, zero)
    # whole_model_sampling: the rollout and the eval hold every partitioned parameter at once
    whole = zero.stage >= 3 and cfg.whole_model_sampling is True
    sampled = BYTES[p.dtype] * (model.params - model.small) if whole else gathered
    m = model.meter
    kind = "ckpt" if p.gradient_checkpointing else "train"
    act, saved = m.activation(kind, batches["train"])
    if t.beta_kl > 0 and p.lora is not None:  # the reference's no-grad forward while the graph is alive
        act = max(act, saved + m.activation("nograd", batches["train"])[0])
    decode = model.vae_peak(batches["decode"]) if batches["decode"] else 0.0
    rollout = max(m.activation("nograd", batches["rollout"])[0], decode)
    evaluation = 0.0
    if batches["eval"]:
        decode_eval = model.vae_peak(batches["decode_eval"]) if batches["decode_eval"] else 0.0
        evaluation = max(m.activation("nograd", batches["eval"])[0], decode_eval)
    step_fp32 = 0.0 if zero.offload_optimizer else 4 * min(model.trained / world, zero.sub_group_size)
    # policy.offload_frozen: the text encoders come to the GPU while new prompts are encoded (the first
    # epochs; encodings are cached in host memory), next to whatever is resident then: the persistent
    # terms, and the gathered transformer if the trainer encoded inside a whole-model gather (it does not:
    # Trainer.evaluate encodes before it gathers); their own activations are not modeled (no grad, 128
    # tokens: tens of MiB)
    moved_in = text_encoder_bytes(cfg, model) if p.offload_frozen else 0.0
    encode = {"text encoders moved in": moved_in}
    if whole and batches["encode_in_whole"]:
        encode["whole transformer gathered (encoding inside the gather)"] = sampled
    return {
        "training micro-step": {"activations (measured)": act, "ZeRO-3 gathered parameters": gathered},
        "rollout step": {"forward / VAE decode (measured)": rollout, "ZeRO-3 gathered parameters": sampled},
        "eval step": {"forward / VAE decode (measured)": evaluation, "ZeRO-3 gathered parameters": sampled},
        "optimizer step": {"fp32 gradient of the partition": step_fp32},
        "prompt encoding": encode,
    }


def memory(cfg: RunConfig, world: int, model: Model, zero: Zero) -> dict:
    """Per-GPU bytes: the persistent terms, each phase's transients, each phase's total and the peak,
    at the batch sizes of the trainer's own epoch for ``cfg`` (``fastcps.plan.epoch.counted_epoch``)."""
    from fastcps.plan.epoch import call_batches, counted_epoch

    n_max = max(trained_steps(cfg, model.sigmas(cfg.sampler.num_steps)))
    keep = persistent(cfg, world, model, zero, n_max)
    batches = call_batches(counted_epoch(cfg, world, model))
    trans = transients(cfg, world, model, zero, batches)
    base = sum(keep.values())
    totals = {ph: base + sum(v.values()) for ph, v in trans.items()}
    phase = max(totals, key=totals.get)
    return {
        "persistent": keep,
        "transients": trans,
        "phase_totals": totals,
        "peak": totals[phase],
        "peak_phase": phase,
        "stage": zero.stage,
        "batches": batches,
    }


def checkpoint_files(cfg: RunConfig, world: int, model: Model, stage: int) -> dict:
    """Bytes of one checkpoint, all ranks' files together, by what ``fastcps.checkpoint.save_checkpoint``
    writes: DeepSpeed's model states (a LoRA run excludes the frozen base: ``exclude_frozen_parameters``)
    and optimizer states (fp32 master + Adam m, v of the trained parameters, every rank's partition),
    each rank's EMA (fp32; ZeRO-3: its partition, else the whole trained set on every rank) and the
    export (``fastcps.checkpoint.export``): for LoRA the adapter in fp32 twice (``policy.safetensors``,
    diffusers' ``pytorch_lora_weights.safetensors``), for full fine-tuning the whole transformer in the
    trained dtype (``transformer/``, sharded)."""
    wb, lora = BYTES[cfg.policy.dtype], cfg.policy.lora is not None
    out = {
        "model states": wb * (model.trained if lora else model.params),
        "optimizer states (fp32 master, Adam m, v)": 12 * model.trained,
        "EMA": 4 * model.trained * (1 if stage >= 3 else world) if cfg.train.ema_decay else 0,
        "policy.safetensors": 4 * model.trained if lora else 0,
        "pytorch_lora_weights.safetensors": 4 * model.trained if lora else 0,
        "transformer/ (sharded export)": 0 if lora else wb * model.params,
    }
    return out


def save_host_peak(cfg: RunConfig, world: int, model: Model, zero: Zero) -> int:
    """Host bytes rank 0 holds at once while it writes a checkpoint (the save's steps run one after the
    other: the largest of them). The export holds one shard (``fastcps.checkpoint.export.MAX_SHARD_BYTES``,
    the whole export when smaller; a FLUX/SD3 block, < 1 GB, never exceeds it) or, for LoRA, the fp32
    adapter; DeepSpeed's ``torch.save`` copies each device tensor to host as it writes it, the largest
    being a flat fp32 optimizer partition (ZeRO-1/2: trained / world elements; ZeRO-3: at most
    ``sub_group_size``; without ZeRO: one parameter's state, at most the largest module's) and none when
    the optimizer is offloaded (its states already live in host memory)."""
    from fastcps.checkpoint.export import MAX_SHARD_BYTES

    wb = BYTES[cfg.policy.dtype]
    export = 4 * model.trained if cfg.policy.lora is not None else min(MAX_SHARD_BYTES, wb * model.params)
    if zero.stage == 0:
        partition = model.largest_fetch
    else:
        partition = model.trained / world
        partition = min(partition, zero.sub_group_size) if zero.stage >= 3 else partition
    states = 0 if zero.offload_optimizer else 4 * partition
    return int(max(export, states))


def with_changes(cfg: RunConfig, changes: dict) -> RunConfig:
    """A copy of ``cfg`` with dotted-key changes applied (``{"train.minibatch_size": 2}``)."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        obj = out
        *path, last = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return out


def mean_trained(cfg: RunConfig, sigmas) -> tuple[float, int, int]:
    counts = trained_steps(cfg, sigmas)
    return float(np.mean(counts)), min(counts), max(counts)
