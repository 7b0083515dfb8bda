"""Bytes per GPU while the models load, for the resource plan (fastcps.plan), term by term.

What the code does (``fastcps.policies.flux.DiffusersPolicy._load_common``, ``fastcps.trainer.Trainer``):
the policy loads the transformer, then the VAE (to the device), then the text encoders (to the device,
or kept on the CPU with ``policy.offload_frozen``); the trainer then hands the transformer to
``deepspeed.initialize``. Everything the policy put on the device is still there during
``initialize``, so the load phase peaks at its end.

- ZeRO-0/1/2 (and the toy at any stage): the whole transformer goes to the device in the policy
  (``Module.to`` moves it tensor by tensor, freeing each CPU copy as it goes: one copy on the device);
  DeepSpeed's ``module.to(device)`` is then a no-op (deepspeed 0.19.8 runtime/engine.py:2093-2094) and
  so is its cast to the config's bf16/fp16 (engine.py:1859-1862: only tensors of another dtype are
  cast; the trainer sets the config's dtype from ``policy.dtype``). ZeRO-1/2 then flattens the trained
  parameters into one buffer on the device only when the device has room for it, else through the CPU
  (runtime/zero/stage_1_and_2.py:450-460): not a term that can exceed the device.
- ZeRO-3 (FLUX, SD3): the transformer stays on the CPU (``Policy.deferred_placement``);
  ``fastcps.engine.partition_zero3`` partitions it with ``deepspeed.zero.Init(module=...)`` before
  ``initialize``, PARAMETER BY PARAMETER, not module by module: for each tensor in turn it moves the
  whole tensor to the device, broadcasts it from rank 0, allocates this rank's partition (numel/world,
  padded to a multiple of world), copies its slice and frees the whole tensor
  (runtime/zero/partition_parameters.py:1209-1215 ``_convert_to_zero_parameters``; 1200-1206
  ``_zero_init_param``; 1778-1889 ``_partition_param``; 314-330 ``free_param``). So the device holds the
  partitions done so far plus one whole tensor: at most params/world (plus padding: < world elements
  a tensor) plus the largest tensor. Every tensor is partitioned here, the small ones too: those below
  ``stage3_param_persistence_threshold`` become whole again at their first forward (training, not
  load: ``fastcps.plan.costs.persistent`` counts them). ``initialize`` then moves nothing
  (engine.py:2077-2078, 2093: a model whose parameters have a ``ds_id`` is left where it is).
  Without this step DeepSpeed would move the whole transformer to the device first
  (engine.py:2093-2094) and only then partition it (runtime/zero/parameter_offload.py:258-279).

The optimizer's partitions (fp32 master, Adam moments, gradient buffers), built at the end of
``initialize``, stay for the whole run, and full fine-tuning's frozen KL reference loads at its first
use in training (``DiffusersPolicy.reference``): ``fastcps.plan.costs.persistent`` counts those.
"""

from __future__ import annotations

import math


def deferred(family: str) -> bool:
    """Whether the family's policy leaves the transformer on the CPU under ZeRO-3
    (``Policy.deferred_placement``: ``FamilyPlan.deferred_zero3``); the toy (no plan facts) goes to the
    device whole. A ValueError names the families for an unknown one."""
    from fastcps.policies.families import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"family = {family!r}: choose one of {', '.join(FAMILIES)}")
    f = FAMILIES[family]
    return f.plan is not None and f.plan_facts().deferred_zero3


def load_peak_bytes(
    *,
    family: str,
    stage: int,
    world: int,
    params: int,
    small: int,
    dtype_bytes: int,
    vae_params: int,
    text_encoder_params: float,
    offload_frozen: bool,
    largest_fetch: int,
    vae_dtype_bytes: int | None = None,
) -> dict:
    """Bytes per GPU at the load phase's peak (the end of ``deepspeed.initialize``'s partitioning),
    term by term, plus ``"peak"`` (their sum). Counts are elements (parameters), not billions:
    ``params`` every transformer parameter (LoRA included), ``small`` those in tensors below ZeRO-3's
    persistence threshold (partitioned like the rest at load: it bounds nothing here and is checked
    only), ``largest_fetch`` the largest module's own parameters (an upper bound on the largest single
    tensor, the one whole tensor ZeRO-3's partitioning holds at once), ``vae_params``,
    ``text_encoder_params`` (all the policy's text encoders together, on the device unless
    ``offload_frozen``). ``family``: a registry name (``fastcps.policies.families``; the toy goes to the
    device whole at every stage). ``vae_dtype_bytes``: the VAE's bytes per parameter (default
    ``dtype_bytes``; the policies keep it in fp32). See the module docstring for the DeepSpeed code
    behind each term."""
    is_deferred = deferred(family)
    if world < 1:
        raise ValueError(f"world = {world} must be >= 1")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage = {stage} must be 0, 1, 2 or 3")
    if not 0 <= small <= params or not 0 <= largest_fetch <= params:
        raise ValueError(
            f"need 0 <= small ({small}) <= params ({params}) and 0 <= largest_fetch "
            f"({largest_fetch}) <= params"
        )
    partitioned = stage == 3 and is_deferred
    out: dict[str, float] = {}
    # not partitioned at load: the policy's whole transformer, the only copy on the device
    out["transformer (before partitioning)"] = 0.0 if partitioned else float(dtype_bytes * params)
    # ZeRO-3: every partition done so far (all of them at the last tensor); the padding that rounds each
    # tensor's partition up is under one element a tensor (a few KB for FLUX.1-dev's ~1,000 tensors)
    out["transformer partitions (1/world of every tensor)"] = (
        float(dtype_bytes * math.ceil(params / world)) if partitioned else 0.0
    )
    out["transformer tensor being partitioned (whole, one at a time)"] = (
        float(dtype_bytes * largest_fetch) if partitioned else 0.0
    )
    out["VAE"] = float((vae_dtype_bytes or dtype_bytes) * vae_params)
    out["text encoders"] = 0.0 if offload_frozen else float(dtype_bytes * text_encoder_params)
    out["peak"] = sum(out.values())
    return out


def load_phase(cfg, world: int, model, stage: int) -> dict:
    """``load_peak_bytes`` of a run config (``fastcps.config.RunConfig``) and its measured model
    (``fastcps.plan.costs.Model``) under ZeRO ``stage``."""
    from fastcps.plan import costs as pc

    return load_peak_bytes(
        family=cfg.policy.name,
        stage=stage,
        world=world,
        params=model.params,
        small=model.small,
        dtype_bytes=pc.BYTES[cfg.policy.dtype],
        vae_params=model.vae_params,
        text_encoder_params=pc.text_encoder_bytes(cfg, model) / pc.BYTES[cfg.policy.dtype],
        offload_frozen=cfg.policy.offload_frozen,
        largest_fetch=model.largest_fetch,
        vae_dtype_bytes=pc.BYTES[pc.VAE_DTYPE],
    )
