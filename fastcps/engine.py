"""The DeepSpeed side of a run: its JSON filled in from the run config, and ZeRO-3 partitioning before
``deepspeed.initialize`` (``fastcps.trainer.Trainer`` calls these; the plan mirrors them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastcps.config import RunConfig


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed JSON of ``cfg.deepspeed_config`` filled in for this run: batch sizes per rank,
    gradient clipping, the precision and ZeRO stage of the run config (a resolved ``auto`` included),
    fp32 gradient accumulation and reduction for a bf16/fp16 model under ZeRO-2/3."""
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} (config key `deepspeed_config`) not found")
    ds = json.loads(path.read_text())
    t = cfg.train
    # Accumulation is driven explicitly (set_gradient_accumulation_boundary): one window covers
    # gradient_accumulation_steps minibatches x every trained step, whose count may change per epoch.
    ds.update(
        train_micro_batch_size_per_gpu=t.minibatch_size,
        gradient_accumulation_steps=1,
        train_batch_size=t.minibatch_size * world,
        gradient_clipping=t.max_grad_norm,
    )
    ds.setdefault("zero_allow_untested_optimizer", True)  # our AdamW subclass skips non-finite steps
    ds.setdefault("steps_per_print", 10**9)
    dtype = cfg.policy.dtype
    ds["bf16"] = {"enabled": dtype == "bf16"}
    ds["fp16"] = {"enabled": dtype == "fp16"}
    if cfg.zero_stage is not None:  # the run config's (a resolved "auto" included) wins over the JSON's
        ds.setdefault("zero_optimization", {})["stage"] = int(cfg.zero_stage)
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if dtype in ("bf16", "fp16") and stage in (2, 3):
        # One accumulation window sums minibatches x trained steps micro-steps (e.g. 18): a bf16 sum
        # keeps 8 mantissa bits, so each later micro-step's gradient loses low bits to the running
        # total. DeepSpeed 0.19.8 keeps the summed gradient partition in `data_types.grad_accum_dtype`
        # (ZeRO-3: runtime/zero/stage3.py:791 grad_partitions_flat_buffer, summed at :2030; ZeRO-2:
        # stage_1_and_2.py:1259-1300, the fp32 "compact" partition buffer replacing the bf16
        # grads_in_partition, :2179-2194) and reduces each micro-step's gradients across ranks in
        # `communication_data_type` (stage3.py:1870 / stage_1_and_2.py:1493: cast, reduce, cast to
        # the accumulation dtype). Cost per GPU: +2 bytes per trained parameter / world (the fp32
        # partition instead of a bf16 one) and +2 bytes x zero_optimization.reduce_bucket_size (the
        # reduce bucket in fp32; x2 for ZeRO-2 with overlap_comm). Only ZeRO-2/3: without ZeRO
        # DeepSpeed refuses a bf16 model with fp32 accumulation (engine.py:2313-2323), and ZeRO-1
        # would switch to its BF16_Optimizer wrapper (engine.py:2305-2310), untested here. A value
        # the user's DeepSpeed JSON sets wins.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
    return ds


def partition_zero3(module: torch.nn.Module, ds_config: dict) -> None:
    """Partition ``module``'s parameters under ZeRO-3 before ``deepspeed.initialize``, tensor by tensor,
    from wherever they are (the CPU: ``Policy.deferred_placement``), so that no rank ever holds the whole
    model on its device.

    Given a module that is not partitioned yet, ``deepspeed.initialize`` first moves all of it to the
    device (deepspeed 0.19.8, runtime/engine.py:2093-2094, ``_configure_distributed_model``:
    ``if not (self.dont_change_device or is_zero_init_model): self.module.to(self.device)``, where
    ``is_zero_init_model`` = some parameter has a ``ds_id``, engine.py:2077-2078) and only then partitions
    it (runtime/zero/parameter_offload.py:258-279 ``Init(module=...)``). ``deepspeed.zero.Init(module=...)``
    here does that same partitioning first, one tensor at a time
    (runtime/zero/partition_parameters.py:1209-1215 ``_convert_to_zero_parameters``: ``param.data =
    param.data.to(self.local_device)``, broadcast from rank 0, ``param.partition()``: this rank's
    1/world slice copied out, the whole tensor freed, partition_parameters.py:1200-1206, 1778-1889); the
    engine then sees a partitioned model and moves nothing. The engine skips its cast to the bf16/fp16
    of the config for such a model (engine.py:1859), so it is done here first, on the CPU (a no-op when
    the policy's dtype is the config's, as the trainer sets it). Parameters added later (none today)
    would be partitioned by the engine as before (parameter_offload.py:262-263). Buffers are never
    partitioned: the policy put them on the device."""
    import copy

    import deepspeed
    from deepspeed.runtime.engine import CASTABLE_DTYPES

    dtype = (
        torch.bfloat16
        if ds_config.get("bf16", {}).get("enabled")
        else torch.float16
        if ds_config.get("fp16", {}).get("enabled")
        else None
    )
    if dtype is not None:
        for p in module.parameters():
            if p.dtype in CASTABLE_DTYPES and p.dtype != dtype:
                p.data = p.data.to(dtype)
    # the arguments parameter_offload.py:271-279 passes (data-parallel group: the world; offload device
    # and pinning: read from the config by Init itself, partition_parameters.py:1160-1162)
    deepspeed.zero.Init(
        module=module, config_dict_or_path=copy.deepcopy(ds_config), dtype=next(module.parameters()).dtype
    )


def keep_lora_whole(zero: dict, trained) -> None:
    """LoRA matrices whole on every rank under ZeRO-3 (never gathered): ZeRO-3 keeps a tensor whole when
    its size is at most ``stage3_param_persistence_threshold`` (deepspeed runtime/zero/parameter_offload.py,
    ``_mark_persistent_parameters``); FLUX's r-64 matrices reach 64 x 12288, above DeepSpeed's 1e5
    default. The threshold becomes the largest trained tensor's size; the frozen base's weight matrices
    (3072 x 3072 and up in FLUX) stay partitioned. A threshold the DeepSpeed JSON sets wins."""
    largest = max((p.numel() for p in trained), default=0)
    zero.setdefault("stage3_param_persistence_threshold", max(100_000, largest))
