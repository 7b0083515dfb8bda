"""Where the transformer is when DeepSpeed gets it (issue 18, point 5): under ZeRO-3 no rank ever holds
the whole FLUX/SD3 transformer on its device (it stays on the CPU and is partitioned tensor by tensor
before ``deepspeed.initialize``: ``fastcps.engine.partition_zero3``); under ZeRO-2 it is on the device,
whole, as every rank keeps it. And the load-phase bytes the plan gets (``fastcps.plan.load``).

The trainer runs in this process up to ``deepspeed.initialize`` (replaced by a recorder that stops it),
with the training device set to ``meta``: a device that is not the CPU and needs no GPU, so "on the
device" and "on the CPU" differ here as on a GPU machine. ZeRO-3's real ``deepspeed.zero.Init`` runs
(world of one, gloo, DeepSpeed's CPU accelerator: its partitions land on the CPU); a wrapper records
where the parameters are when it starts.
"""

import json
from pathlib import Path

import pytest
import torch

import fastcps.distributed as fdist
from fastcps.config import RunConfig, load_config, validate_tree
from fastcps.plan.load import load_peak_bytes
from fastcps.testing import save_tiny_flux, save_tiny_sd3

ROOT = Path(__file__).resolve().parent.parent
DEVICE = torch.device("meta")
CONFIGS = {"flux": "flux_pickscore.json", "sd3": "sd35_ocr.json"}


class Reached(Exception):
    """``deepspeed.initialize`` was called: the recorder has what it needs."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"flux": save_tiny_flux(root / "flux"), "sd3": save_tiny_sd3(root / "sd3")}


def ds_config(folder: Path, stage: int) -> Path:
    ds = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    if stage != 3:
        ds["zero_optimization"] = {
            k: v for k, v in ds["zero_optimization"].items() if not k.startswith("stage3_")
        }
    path = folder / f"ds_zero{stage}.json"
    path.write_text(json.dumps(ds))
    return path


def where(module: torch.nn.Module) -> dict:
    return {
        n: {
            "device": p.device.type,
            "held": p.data.numel(),
            "partitioned": hasattr(p, "ds_id"),
            "numel": int(getattr(p, "ds_numel", p.numel())),
        }
        for n, p in module.named_parameters()
    }


def run_to_initialize(family, path, stage, tmp_path, monkeypatch, lora=True):
    """Build the trainer up to ``deepspeed.initialize``; return (policy, parameters at zero.Init's start or
    None, parameters at initialize's call, the model given to initialize)."""
    import importlib

    import deepspeed

    from fastcps.trainer import Trainer

    sets = [
        f"policy.pretrained={path}",
        "policy.dtype=bf16",
        "policy.resolution=64",
        "policy.max_sequence_length=32",
        "policy.offload_frozen=false",
        "policy.gradient_checkpointing=true",
        'rewards=[{"name": "jpeg_compressibility"}]',
        "prompts.source=configs/prompts/ocr.txt",  # sd35_ocr.json trains on ocr:train, a download
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=2",
        "train.rollout_batch_size=2",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=1",
        "eval.num_prompts=2",
        "log.progress=false",
        "log.tensorboard=false",
        f"output_dir={tmp_path}",
        f"deepspeed_config={ds_config(tmp_path, stage)}",
    ]
    sets.append('policy.lora={"r": 4, "alpha": 8.0}' if lora else "policy.lora=null")
    cfg = load_config(RunConfig, str(ROOT / "configs" / CONFIGS[family]), sets)
    validate_tree(cfg, world_size=1)
    monkeypatch.chdir(ROOT)  # the configs name their prompt files from the repository root
    # DeepSpeed's process group JIT-builds its shared-memory all-reduce for CPU ranks (minutes on 2 cores,
    # again whenever another process rebuilt it with other flags); a world of one reduces nothing
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    fdist.init()  # a world of one over gloo (conftest's autouse fixture ends it)
    monkeypatch.setattr(fdist, "local_device", lambda: DEVICE)
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)  # zero.Init swaps it
    seen = {}
    real_init = deepspeed.zero.Init

    def init(*args, module=None, **kwargs):
        seen["zero_init"] = where(module)
        if any(w["device"] == DEVICE.type for w in seen["zero_init"].values()):
            raise Reached  # (a real Init cannot copy out of meta tensors): the test says what went wrong
        return real_init(*args, module=module, **kwargs)

    def initialize(model, optimizer, config):
        seen["initialize"], seen["model"] = where(model), model
        raise Reached

    monkeypatch.setattr(deepspeed.zero, "Init", init)
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    trainer = Trainer.__new__(Trainer)
    with pytest.raises(Reached):
        Trainer.__init__(trainer, cfg, tmp_path / "run")
    return trainer.policy, seen.get("zero_init"), seen.get("initialize"), seen.get("model")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_zero3_never_puts_the_whole_transformer_on_the_device(tiny, tmp_path, monkeypatch, family):
    policy, at_partition, at_initialize, model = run_to_initialize(
        family, tiny[family], 3, tmp_path, monkeypatch
    )
    # when partitioning starts, every parameter (the LoRA adapters too) is still on the CPU, whole
    assert at_partition is not None, (
        "the trainer did not partition the transformer before deepspeed.initialize"
    )
    on_device = [n for n, w in at_partition.items() if w["device"] != "cpu"]
    assert not on_device, (
        f"{len(on_device)} parameters reached the training device before partitioning: {on_device[:3]}"
    )
    assert not any(w["partitioned"] for w in at_partition.values())
    assert model is policy.transformer and policy.deferred_placement
    lora = [n for n in at_initialize if "lora_" in n]
    assert lora and len(at_initialize) > len(lora) and set(at_initialize) == set(at_partition)
    # at initialize: every tensor is a ZeRO-3 partition holding nothing at rest; none on the training device
    assert all(w["partitioned"] and w["held"] == 0 for w in at_initialize.values())
    assert not [n for n, w in at_initialize.items() if w["device"] == DEVICE.type]
    assert {n: w["numel"] for n, w in at_initialize.items()} == {
        n: w["numel"] for n, w in at_partition.items()
    }
    assert all(p.ds_tensor.numel() == p.ds_numel for p in model.parameters())  # world of one: all of it
    # what is not partitioned is on the device: buffers (SD3's positional table), VAE, text encoders, ids
    assert all(b.device == DEVICE for b in policy.transformer.buffers())
    assert family != "sd3" or any(True for _ in policy.transformer.buffers())
    assert {p.device for p in policy.vae.parameters()} == {DEVICE}
    assert {p.device for m in policy._text_encoders() for p in m.parameters()} == {DEVICE}
    if family == "flux":
        assert policy.img_ids.device == DEVICE and policy.txt_ids.device == DEVICE
    assert policy.transformer.is_gradient_checkpointing and policy.transformer.training


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_zero2_puts_the_whole_transformer_on_the_device(tiny, tmp_path, monkeypatch, family):
    policy, at_partition, at_initialize, model = run_to_initialize(
        family, tiny[family], 2, tmp_path, monkeypatch
    )
    assert model is policy.transformer and not policy.deferred_placement
    assert at_partition is None  # DeepSpeed's ZeRO-2 keeps every weight whole on every rank
    assert any("lora_" in n for n in at_initialize)
    assert all(
        w["device"] == DEVICE.type and not w["partitioned"] and w["held"] == w["numel"]
        for w in at_initialize.values()
    )
    assert all(b.device == DEVICE for b in policy.transformer.buffers())


def test_full_fine_tuning_reference_loads_on_the_device_under_zero3(tiny, tmp_path, monkeypatch):
    """No LoRA: the KL reference is the base loaded again, frozen, outside DeepSpeed, on the device."""
    policy, at_partition, at_initialize, _ = run_to_initialize(
        "flux", tiny["flux"], 3, tmp_path, monkeypatch, lora=False
    )
    assert at_partition is not None and {w["device"] for w in at_partition.values()} == {"cpu"}
    assert not any("lora_" in n for n in at_initialize) and all(
        w["partitioned"] for w in at_initialize.values()
    )
    with policy.reference(None) as base:
        assert base is not policy.transformer and {p.device for p in base.parameters()} == {DEVICE}
        assert not any(p.requires_grad for p in base.parameters())


# --- the plan's load-phase bytes ------------------------------------------------------------------------

FLUX_DEV = dict(
    params=11_901_408_320,
    small=2_500_000,
    dtype_bytes=2,
    vae_params=83_819_683,
    text_encoder_params=4_885_000_000,
    largest_fetch=113_246_208,
)  # FLUX.1-dev-sized, bf16


def test_load_peak_zero3_is_a_partition_plus_one_tensor():
    z3 = load_peak_bytes(family="flux", stage=3, world=8, offload_frozen=True, **FLUX_DEV)
    n, b = FLUX_DEV["params"], FLUX_DEV["dtype_bytes"]
    assert z3["transformer (before partitioning)"] == 0
    assert z3["transformer partitions (1/world of every tensor)"] == b * -(-n // 8)
    assert z3["transformer tensor being partitioned (whole, one at a time)"] == b * FLUX_DEV["largest_fetch"]
    assert z3["text encoders"] == 0 and z3["VAE"] == b * FLUX_DEV["vae_params"]
    assert z3["peak"] == sum(v for k, v in z3.items() if k != "peak")
    assert z3["peak"] < 0.15 * b * n  # 3.1 GiB of the 22.2 GiB model on each of 8 ranks
    z2 = load_peak_bytes(family="flux", stage=2, world=8, offload_frozen=True, **FLUX_DEV)
    assert z2["transformer (before partitioning)"] == b * n and z2["peak"] == b * n + z2["VAE"]
    assert z2["transformer partitions (1/world of every tensor)"] == 0
    # the text encoders count unless offloaded; one rank partitions into one piece: the model plus a tensor
    on = load_peak_bytes(family="sd3", stage=3, world=1, offload_frozen=False, **FLUX_DEV)
    assert on["text encoders"] == b * FLUX_DEV["text_encoder_params"]
    assert on["transformer partitions (1/world of every tensor)"] == b * n
    # the toy goes to the device whole at every stage
    toy = load_peak_bytes(family="toy", stage=3, world=8, offload_frozen=True, **FLUX_DEV)
    assert toy["transformer (before partitioning)"] == b * n
    with pytest.raises(ValueError, match="family"):
        load_peak_bytes(family="sdxl", stage=3, world=8, offload_frozen=True, **FLUX_DEV)


def test_lora_matrices_stay_whole_under_zero3():
    """FLUX.1-dev's r-64 LoRA matrices (up to 64 x 12288) are above DeepSpeed's default persistence
    threshold (1e5): the trainer raises it to the largest trained tensor, so they are never partitioned,
    while the frozen 3072 x 3072 weights (9.4 M) stay above it; a threshold the JSON sets wins."""
    from fastcps.engine import keep_lora_whole

    trained = [torch.empty(64, 3072, device="meta"), torch.empty(12288, 64, device="meta")]
    zero = {"stage": 3}
    keep_lora_whole(zero, trained)
    assert zero["stage3_param_persistence_threshold"] == 12288 * 64 < 3072 * 3072
    zero = {"stage": 3}
    keep_lora_whole(zero, [torch.empty(4, 32, device="meta")])
    assert zero["stage3_param_persistence_threshold"] == 100_000  # never below DeepSpeed's default
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    keep_lora_whole(zero, trained)
    assert zero["stage3_param_persistence_threshold"] == 0
