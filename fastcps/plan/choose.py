"""The ``auto`` settings of a run, made before any weight loads from the resource plan: ZeRO stage,
gradient checkpointing, whole-model sampling and the micro-batch (``choose``; the trainer's
``resolve_auto`` makes them for the smallest GPU of the run, ``python -m fastcps.plan --gpu-mem`` for
the memory it is given).

Order. Of the settings whose planned peak fits the GPU's memory minus a reserve, the cheapest in FLOPs
(no gradient checkpointing: no re-forward per trained step), then in traffic (ZeRO-2 before ZeRO-3, then
the ZeRO collectives' bytes per epoch counted on the trainer's own epoch: whole-model sampling, fewer
and larger calls), then the largest micro-batch (throughput). The micro-batch is both the rollout's
batch and the training minibatch (so the rollout's log-probs stay reusable for later accumulation
windows: ``train.old_logprob``), with the images per optimizer step kept as configured (8 x 3 -> 4 x 6).

The reserve (``memory_reserve``: by default 8 % of the GPU's total memory) is what the plan's tensors
leave out; each is a few hundred MiB to a few GiB, and they add up:

- the CUDA context and the kernels' modules, outside the caching allocator: ~0.3-0.8 GiB per process
  (PyTorch's CUDA semantics notes, "Memory management": ``memory_allocated`` excludes it and what
  nvidia-smi shows; pytorch/pytorch#34323: 781 MB at start-up);
- cuBLAS workspaces, per handle and stream (the reward thread's stream too): PyTorch gives cuBLASLt
  32 MiB on Hopper, 4 MiB on large Ampere (pytorch/pytorch#120925, after NVIDIA's cublasSetWorkspace
  recommendation), sized by ``CUBLAS_WORKSPACE_CONFIG`` / ``CUBLASLT_WORKSPACE_SIZE``;
- NCCL: ``NCCL_BUFFSIZE`` (4 MiB by default) per channel per peer and protocol, with more channels
  across nodes (NCCL's environment-variable docs: NCCL_BUFFSIZE, NCCL_MIN/MAX_NCHANNELS), NVLink SHARP
  buffers on top (NVIDIA/JAX-Toolbox#383 turned NVLS off for the memory it takes): measured 544-688 MB
  per communicator on 4 A100s (NVIDIA/nccl#964), 1.6 GB for one and ~6 GB for three (NVIDIA/nccl#864);
- fragmentation of the caching allocator over 50 GiB of mixed-size activations: 1.83 GiB reserved but
  unallocated at the OOM of a 79 GiB card (vllm-project/compressed-tensors#587, which now keeps 5 %),
  ~20 GiB in a GRPO trainer on B200 without expandable segments (NovaSky-AI/SkyRL#1768); the training
  entry points turn on expandable segments (``fastcps.allocator``), which bounds this, not removes it.

``--gpu-mem`` and the GPU's memory are the total memory torch reports (``get_device_properties(d).
total_memory`` in GiB): an "80 GB" H100 reports 79.1 GiB ("GPU 0 has a total capacity of 79.11 GiB",
vllm-project/vllm#27508), an 80 GB A100 79.25 GiB (HiDream-ai/VAREdit#6). ``--gpu-mem 80`` is the
nominal card, 0.9 GiB above what an H100 has; ``--gpu-mem 79.1`` is the H100 as the trainer sees it
(tests/test_plan_goals.py pins the FLUX.1-dev goals at both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from fastcps.config import ConfigError, MemoryReserveConfig, RunConfig
from fastcps.plan import costs as pc
from fastcps.runtime import GIB

CHOICES = ((2, False), (3, False), (2, True), (3, True))  # cheapest first: no gathers, then no re-forward


def choice_name(stage: int, checkpointing: bool) -> str:
    """The key of a (ZeRO stage, gradient checkpointing) choice in the plan's output: zero2, zero3+ckpt,
    ..."""
    return f"zero{stage if stage >= 3 else 2}{'+ckpt' if checkpointing else ''}"


# --- the reserve ----------------------------------------------------------------------------------------


def reserve_gib(total_gib: float, reserve: MemoryReserveConfig) -> float:
    """GiB kept free of the plan's peak on a GPU of ``total_gib``: the larger of the share and the floor."""
    return max(reserve.fraction * total_gib, reserve.gib)


def parse_reserve(text: str) -> MemoryReserveConfig:
    """``--reserve``: "8%" (of the GPU's memory) or GiB ("6.5", "6.5GiB")."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|gib)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"--reserve {text!r}: give a percentage of the GPU's memory (8%) or GiB (6.5)")
    value = float(m.group(1))
    if m.group(2) == "%":
        if not value < 100:
            raise ValueError(f"--reserve {text!r}: a percentage below 100")
        return MemoryReserveConfig(fraction=value / 100, gib=0.0)
    return MemoryReserveConfig(fraction=0.0, gib=value)


# --- the micro-batch ------------------------------------------------------------------------------------


def micro_batches(cfg: RunConfig) -> list[int | None]:
    """``train.micro_batch``'s candidates, largest first: every divisor of the images per optimizer step
    for "auto", the one given, or [None] (the sizes as written)."""
    t = cfg.train
    if t.micro_batch is None:
        return [None]
    step = t.minibatch_size * t.gradient_accumulation_steps
    if isinstance(t.micro_batch, int):
        return [t.micro_batch]
    return [b for b in range(step, 0, -1) if step % b == 0]


def micro_batch_changes(cfg: RunConfig, b: int | None) -> dict:
    """The config changes of micro-batch ``b``: rollout batch = minibatch = b, the accumulation scaled so
    that the images per optimizer step stay (``train.micro_batch`` then None: concrete)."""
    if b is None:
        return {}
    t = cfg.train
    step = t.minibatch_size * t.gradient_accumulation_steps
    if step % b:
        raise ConfigError(f"train.micro_batch = {b} does not divide the {step} images per optimizer step")
    return {
        "train.micro_batch": None,
        "train.rollout_batch_size": b,
        "train.minibatch_size": b,
        "train.gradient_accumulation_steps": step // b,
    }


# --- the search -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    stage: int
    checkpointing: bool
    whole: bool  # whole_model_sampling (ZeRO-3 only)
    micro_batch: int | None  # None: the sizes as written
    peak: float  # bytes per GPU: the larger of the epoch's phases and the load phase
    traffic: float  # bytes per GPU per epoch of ZeRO's collectives

    def key(self) -> tuple:
        """Cheapest first: FLOPs (checkpointing), ZeRO-2 before ZeRO-3, traffic, then the largest batch."""
        return (self.checkpointing, self.stage >= 3, self.traffic, -(self.micro_batch or 0))

    def name(self) -> str:
        return choice_name(self.stage, self.checkpointing) + (", whole-model sampling" if self.whole else "")


def zero_traffic(
    cfg: RunConfig, world: int, loader, model: pc.Model, stage: int, checkpointing: bool, **kw
) -> dict:
    """Bytes per GPU per epoch of ZeRO's collectives for ``cfg`` under ``stage`` (``fastcps.plan.epoch.
    zero_traffic`` on the trainer's counted epoch; ``kw``: ``whole_sampling``, ``gather_bytes_per_param``)."""
    from fastcps.plan import epoch as pe

    counted = pe.counted_epoch(cfg, world, model)
    threshold = model.meter_threshold
    # a KL reference forward between the policy's forward and backward resets DeepSpeed's trace: the
    # backward then fetches again what the re-forward fetched (measure.ModuleUses)
    kl = any(phase == "KL reference forward" for phase, _, _ in counted["calls"])
    fetched = {
        "forward": model.meter.gathered("nograd", 1, threshold)["forward"],
        "backward": model.meter.gathered("ckpt" if checkpointing else "train", 1, threshold)[
            "backward_unshared" if kl else "backward"
        ],
    }
    return pe.zero_traffic(
        counted,
        stage=stage,
        world=world,
        gathered_params=model.params - model.small,
        fetched=fetched,
        trained_params=model.trained,
        bytes_per_param=pc.BYTES[cfg.policy.dtype],
        grad_bytes_per_param=pc.grad_bytes(cfg, loader.load_zero(stage)),
        **kw,
    )


def settings(cfg: RunConfig, stage: int, checkpointing: bool, whole: bool, b: int | None) -> RunConfig:
    """``cfg`` with one candidate's settings made concrete."""
    return pc.with_changes(
        cfg,
        {
            "zero_stage": stage,
            "policy.gradient_checkpointing": checkpointing,
            "whole_model_sampling": whole,
            **micro_batch_changes(cfg, b),
        },
    )


def candidates(cfg: RunConfig, world: int, loader, model: pc.Model) -> list[Candidate]:
    """Every setting the config leaves open (``auto``), each with its planned peak and traffic."""
    from fastcps.plan.load import load_phase

    stage, ckpt = cfg.zero_stage, cfg.policy.gradient_checkpointing
    if stage is None:
        stage = loader.zero.stage
    allowed = [(s, c) for s, c in CHOICES if stage in ("auto", s) and ckpt in ("auto", c)]
    if stage != "auto" and stage not in (2, 3):  # a JSON with stage 0 or 1: counted as ZeRO-2's memory
        allowed = [(2, c) for c in ((False, True) if ckpt == "auto" else (ckpt,))]
    want = cfg.whole_model_sampling
    out = []
    for s, c in allowed:
        wholes = [False] if s < 3 or want is False else ([True] if want is True else [True, False])
        for whole in wholes:
            for b in micro_batches(cfg):
                changed = settings(cfg, s, c, whole, b)
                peak = max(
                    pc.memory(changed, world, model, loader.load_zero(s))["peak"],
                    load_phase(cfg, world, model, s)["peak"],
                )
                traffic = zero_traffic(changed, world, loader, model, s, c, whole_sampling=whole)["total"]
                out.append(Candidate(s, c, whole, b, peak, traffic))
    return out


def choose(cfg: RunConfig, world: int, loader, model: pc.Model, limit: float | None) -> dict:
    """The ``auto`` settings: explicit ones win; of the rest, the cheapest candidate (``Candidate.key``)
    whose peak fits ``limit`` bytes, else the one with the smallest peak (it does not fit: the plan says
    so and suggests changes). Without a limit (the CPU, no ``--gpu-mem``): the DeepSpeed JSON's stage,
    no checkpointing, no whole-model sampling unless asked, the configured minibatch. Returns {"stage",
    "checkpointing", "whole_model_sampling", "micro_batch", "changes" (to the config), "peak",
    "peaks" ({(stage, ckpt): bytes} at the chosen micro-batch), "whole_sampling_peak",
    "candidates"}."""
    from fastcps.plan.load import load_phase

    found = candidates(cfg, world, loader, model)
    configured = cfg.zero_stage if cfg.zero_stage is not None else loader.zero.stage
    if limit is None:  # nothing to fit: as written, the JSON's stage for "auto", the cheapest first
        target = loader.zero.stage if configured == "auto" else configured
        mb = cfg.train.micro_batch
        written = cfg.train.minibatch_size if mb == "auto" else mb
        pool = [
            c
            for c in found
            if c.micro_batch == written and c.whole == (cfg.whole_model_sampling is True and c.stage >= 3)
        ]
        pick = next((c for c in pool if c.stage == min(max(int(target), 2), 3)), pool[0])
    else:
        fitting = [c for c in found if c.peak <= limit]
        pick = min(fitting, key=Candidate.key) if fitting else min(found, key=lambda c: (c.peak, c.key()))
    stage = pick.stage if configured in ("auto", 2, 3) else int(configured)
    peaks = {}
    for s, c in CHOICES:
        changed = settings(cfg, s, c, False, pick.micro_batch)
        peaks[(s, c)] = max(
            pc.memory(changed, world, model, loader.load_zero(s))["peak"],
            load_phase(cfg, world, model, s)["peak"],
        )
    whole_peak = None
    if pick.stage >= 3 and cfg.whole_model_sampling is not False:
        whole_peak = next(
            (
                c.peak
                for c in found
                if (c.stage, c.checkpointing, c.micro_batch) == (3, pick.checkpointing, pick.micro_batch)
                and c.whole
            ),
            None,
        )
    return {
        "stage": stage,
        "checkpointing": pick.checkpointing,
        "whole_model_sampling": pick.whole,
        "micro_batch": pick.micro_batch,
        "changes": micro_batch_changes(cfg, pick.micro_batch),
        "peak": pick.peak,
        "peaks": peaks,
        "whole_sampling_peak": whole_peak,
        "candidates": found,
    }


# --- the trainer's resolution ---------------------------------------------------------------------------


def smallest_total_memory(device) -> int:
    """Total memory (bytes) of this rank's GPU, or, in a process group, the smallest of every rank's (an
    all-reduce MIN, on the backend's device: CUDA for nccl, the CPU for gloo): every rank then resolves
    ``auto`` alike, whatever mix of cards the run landed on (ZeRO needs every rank to run the same
    stage, micro-batch and calls)."""
    total = int(torch.cuda.get_device_properties(device).total_memory)
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() < 2:
        return total
    on = torch.device(device) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([total], dtype=torch.int64, device=on)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def resolve_auto(cfg: RunConfig, world: int, device, evaluate) -> tuple[RunConfig, str | None]:
    """``zero_stage`` / ``policy.gradient_checkpointing`` / ``whole_model_sampling`` = "auto" and
    ``train.micro_batch`` made concrete before any weight loads: on a CUDA device the plan's choice for
    the smallest GPU of the run (``smallest_total_memory``) minus ``memory_reserve``; elsewhere (the CPU,
    the toy: nothing to fit) the DeepSpeed JSON's stage, no checkpointing, no whole-model sampling and
    the configured minibatch. Returns the config with concrete values and a line saying what was chosen
    (None when nothing was "auto"). ``evaluate``: the trainer's eval on given parts
    (``fastcps.trainer.evaluate_with``), which the plan counts: the trainer passes it in, so the plan
    does not import the trainer."""
    from fastcps.plan.loader import Loader, zero_section
    from fastcps.policies.families import FAMILIES

    auto_stage, auto_ckpt = cfg.zero_stage == "auto", cfg.policy.gradient_checkpointing == "auto"
    auto_whole, mb = cfg.whole_model_sampling == "auto", cfg.train.micro_batch
    if not (auto_stage or auto_ckpt or auto_whole or mb is not None):
        return cfg, None
    device = torch.device(device)
    fam = FAMILIES.get(cfg.policy.name)
    if device.type != "cuda" or fam is None or fam.plan is None:
        stage, ckpt, whole = None, False, False
        changes = micro_batch_changes(cfg, cfg.train.minibatch_size if mb == "auto" else mb)
        why = f"no GPU memory to fit on {device.type} / {cfg.policy.name}"
    else:
        total = smallest_total_memory(device) / GIB
        reserve = reserve_gib(total, cfg.memory_reserve)
        loader = Loader(cfg, evaluate=evaluate)
        chosen = choose(cfg, world, loader, loader.model(cfg), (total - reserve) * GIB)
        stage, ckpt, whole = chosen["stage"], chosen["checkpointing"], chosen["whole_model_sampling"]
        changes = chosen["changes"]
        peak = chosen["peak"] / GIB
        verdict = "" if peak <= total - reserve else "; it does NOT fit: see python -m fastcps.plan"
        why = (
            f"planned peak {peak:.1f} GiB of {total:.1f} GiB, the smallest GPU of the run; "
            f"{reserve:.1f} GiB kept free by memory_reserve{verdict}"
        )
    if auto_stage:
        changes["zero_stage"] = stage
    if auto_ckpt:
        changes["policy.gradient_checkpointing"] = ckpt
    if auto_whole:
        changes["whole_model_sampling"] = whole
    out = pc.with_changes(cfg, changes)
    shown = (
        out.zero_stage
        if out.zero_stage is not None
        else f"{int(zero_section(cfg).get('stage', 0))} (the DeepSpeed JSON's)"
    )
    t = out.train
    line = (
        f"auto: ZeRO stage {shown}, "
        f"gradient checkpointing {'on' if out.policy.gradient_checkpointing else 'off'}, "
        f"whole-model sampling {'on' if out.whole_model_sampling is True else 'off'}, "
        f"micro-batch {t.minibatch_size} (rollout {t.rollout_batch_size}, {t.gradient_accumulation_steps} "
        f"minibatches per optimizer step) ({why})"
    )
    return out, line
