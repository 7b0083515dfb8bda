"""FLOPs and activation memory of a transformer step, measured on fake tensors: no weights, no GPU.

The model is built on the ``meta`` device from its config (diffusers ``from_config``), LoRA adapters
are added there by peft exactly as ``Policy.add_lora`` does, and every parameter then becomes a fake
CPU tensor (``FakeTensorMode``): ops run through their shape functions only, so the real FLUX.1-dev
transformer (11.9 B parameters) does a forward and backward in seconds on a laptop.

Why fake CPU and not fake CUDA or ``meta``: without a GPU, PyTorch picks the math SDPA kernel for fake
CUDA and for meta tensors, which materialises the S x S attention matrix; the CPU flash kernel keeps
what CUDA's flash / memory-efficient kernels keep (the output and the log-sum-exp). And the autograd
engine cannot run a backward on fake CUDA tensors without a device. Dtypes are the run's (bf16).

:class:`LiveBytes` is one dispatch mode doing both measurements:
- memory: the bytes of every tensor storage an op creates, alive until the storage is freed (a weak
  reference per storage), and their peak: activations saved for backward, temporaries, outputs;
  parameters and buffers are excluded (the caller counts them per ZeRO stage), and so are parameter
  gradients (dropped as they are produced, as ZeRO's reduce-and-free does; its buckets are counted by
  the caller);
- ZeRO-3 fetches (:class:`ModuleUses`): which parameters each phase gathers, module by module;
- FLOPs: ``torch.utils.flop_counter``'s formulas (``flop_registry``, what ``FlopCounterMode`` uses:
  2·m·n·k per matmul, the attention kernels' forward and backward). ``FlopCounterMode`` itself is not
  used for memory because its module tracker keeps gradient-checkpoint recomputations alive (a 4+4
  block FLUX measured 3.57 GiB instead of 0.90 GiB under it); its totals equal ours (tests).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from fastcps.plan.fake import LiveBytes, build, default_dtype, to_fake  # noqa: F401 - this module's API
from fastcps.policies.families import family as family_of
from fastcps.runtime import DTYPES


@dataclass(frozen=True)
class Step:
    """One measured call: ``peak`` bytes alive above the parameters, ``saved`` bytes alive right
    after the forward (the autograd graph's saved tensors plus the output), FLOPs of each phase."""

    batch: int
    peak: int
    saved: int
    forward_flop: int
    backward_flop: int = 0
    uses: dict = field(default_factory=dict)  # phase -> {parameter name: fetches} (ModuleUses)


class ModuleUses:
    """The parameters ZeRO-3 fetches in a call, counted the way DeepSpeed 0.19 fetches them: a module's
    own parameters before each of its forwards (a checkpointed block's re-forward inside the backward
    included) and before its backward, which runs only where the module's output needs a gradient
    (deepspeed runtime/zero/parameter_offload.py: the forward pre-hook; the pre-backward function put
    on outputs that require grad); released after each use. One exception, seen on real DeepSpeed
    (tests/test_zero3.py): a module's backward uses what its re-forward just fetched, unless another
    top-level forward ran between the forward and the backward (the trainer's KL reference forward)
    and reset DeepSpeed's trace. ``uses[phase][name]`` counts the fetches per phase: "forward",
    "backward" (the re-forward's fetch kept for the backward) and "backward_unshared" (fetched twice)."""

    def __init__(self, model: torch.nn.Module):
        self.phase, self.uses = "forward", {}
        self._handles, self._held = [], set()
        for prefix, mod in model.named_modules():
            own = [f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters(recurse=False)]
            if own:
                self._handles.append(mod.register_forward_pre_hook(self._fetch(mod, own)))
                self._handles.append(mod.register_forward_hook(self._on_output(mod, own)))

    def _count(self, phases, names) -> None:
        for phase in phases:
            counts = self.uses.setdefault(phase, Counter())
            for n in names:
                counts[n] += 1

    def _fetch(self, mod, names):
        def hook(m, args):
            if self.phase == "backward":  # a checkpointed block's re-forward
                self._held.add(mod)
                self._count(("backward", "backward_unshared"), names)
            else:
                self._count((self.phase,), names)

        return hook

    def _on_output(self, mod, names):
        def backward(grad):
            shared = mod in self._held
            self._held.discard(mod)
            self._count(("backward_unshared",) if shared else ("backward", "backward_unshared"), names)

        def hook(m, args, out):
            grad_out = next(
                (t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad), None
            )
            # the forward's own output (the re-forward's is not backpropagated through)
            if grad_out is not None and self.phase == "forward":
                grad_out.register_hook(backward)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class TransformerMeter:
    """The real transformer of one config on fake tensors; each (kind, batch) is measured once.

    ``family``: a registry name (``fastcps.policies.families``): its transformer class and its plan
    facts' ``inputs`` (the call's tensors for a batch at ``resolution`` and ``text_tokens``).
    """

    def __init__(
        self,
        family: str,
        config: dict,
        *,
        resolution: int,
        text_tokens: int,
        dtype: str = "bf16",
        lora: tuple | None = None,
        fake: bool = True,
    ):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.family, self.config, self.dtype = family, config, DTYPES[dtype]
        self.resolution, self.text_tokens = resolution, text_tokens
        fam = family_of(family)
        cls, self._inputs = fam.transformer_class(), fam.plan_facts().inputs
        if fake:
            self.mode = FakeTensorMode(allow_non_fake_inputs=True)
            self.model = to_fake(build(cls, config, self.dtype, lora), self.mode)
        else:  # real CPU tensors, random weights: the same measurement, for checking the fake one on small
            # models
            self.mode = contextlib.nullcontext()
            self.model = build(cls, config, self.dtype, lora, device="cpu")
        self.params = list(self.model.parameters()) + list(self.model.buffers())
        for p in self.model.parameters():
            if p.requires_grad:  # ZeRO reduces each gradient into its partition and frees it
                p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        self._cache: dict[tuple, Step] = {}

    def inputs(self, batch: int) -> dict:
        return self._inputs(self.config, batch, self.resolution, self.text_tokens, self.dtype)

    def _run(self, kind: str, batch: int) -> Step:
        train = kind != "nograd"
        if kind == "ckpt":
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()
        self.model.train(train)
        grad = torch.enable_grad() if train else torch.no_grad()
        uses = ModuleUses(self.model)
        try:
            with self.mode, torch.device("cpu"), grad, LiveBytes(self.params) as live:
                out = self.model(**self.inputs(batch))[0]
                saved = live.current
                if train:
                    live.phase = uses.phase = "backward"
                    out.float().square().mean().backward()  # the loss's own cost is a few latent-size ops
                del out
        finally:
            uses.remove()
        return Step(batch, live.peak, saved, live.flops["forward"], live.flops["backward"], uses.uses)

    def gathered(self, kind: str, batch: int, threshold: int) -> dict[str, int]:
        """Elements ZeRO-3 all-gathers in one call of ``kind`` per phase of :class:`ModuleUses` (the
        backward's include the re-forward of checkpointed blocks), counting the tensors of at least
        ``threshold``
        elements (smaller ones stay whole: stage3_param_persistence_threshold).

        Which modules a call uses, and how often, does not depend on its batch: the uses are read from a
        batch ``activation`` measures anyway (at most ``MEASURED_UP_TO``), so pricing the traffic of a
        larger micro-batch measures nothing new (a 60-block transformer's measurement takes ~18 s on
        fake tensors)."""
        numel = {n: p.numel() for n, p in self.model.named_parameters()}
        uses = self.step(kind, min(batch, self.MEASURED_UP_TO)).uses
        return {
            phase: sum(k * numel[n] for n, k in counts.items() if numel[n] >= threshold)
            for phase, counts in uses.items()
        }

    #: batches measured directly; larger ones are extrapolated from the last two (``activation``)
    MEASURED_UP_TO = 3

    def activation(self, kind: str, batch: int) -> tuple[int, int]:
        """(peak, saved) bytes of a ``kind`` call of ``batch`` samples without measuring every batch:
        batches up to ``MEASURED_UP_TO`` are measured, larger ones extend the line through the last two
        measurements. Every activation of the transformer scales with the batch except a few
        batch-independent tensors (rotary tables, ids), so the live bytes at the peak are an affine
        function of the batch from 2 samples on (batch 1 can take other broadcasts: FLUX.1-dev's training
        step peaks 0.13 GiB below the line there). Seen exact on FLUX.1-dev at 512 px, 128 text tokens,
        LoRA r 64: 4 and 8 samples measured = extrapolated to the byte for train, ckpt and nograd
        (tests/test_plan.py checks it on a small FLUX). The choice of micro-batch (``fastcps.plan.choose``)
        prices every candidate this way: three measurements per kind instead of one per candidate."""
        top = self.MEASURED_UP_TO
        if batch <= top:
            s = self.step(kind, batch)
            return s.peak, s.saved
        lo, hi = self.step(kind, top - 1), self.step(kind, top)
        extra = batch - top
        return hi.peak + extra * (hi.peak - lo.peak), hi.saved + extra * (hi.saved - lo.saved)

    def flops(self, kind: str, batch: int) -> tuple[float, float]:
        """(forward, backward) FLOPs of a ``kind`` call of ``batch`` samples, priced as ``activation``
        prices bytes: measured up to ``MEASURED_UP_TO`` samples, beyond on the line through the last two.
        Every op the FLOP counter counts (matmuls, attention) runs over the batch, so the FLOPs are linear
        in it; the rotary tables' and ids' elementwise work is not counted (tests/test_plan.py checks
        the line against measurements). A plan then measures no new batch for the chosen micro-batch."""
        top = self.MEASURED_UP_TO
        if batch <= top:
            s = self.step(kind, batch)
            return s.forward_flop, s.backward_flop
        lo, hi = self.step(kind, top - 1), self.step(kind, top)
        extra = batch - top
        return (
            hi.forward_flop + extra * (hi.forward_flop - lo.forward_flop),
            hi.backward_flop + extra * (hi.backward_flop - lo.backward_flop),
        )

    def step(self, kind: str, batch: int) -> Step:
        """``kind``: "train" (forward + backward), "ckpt" (the same with gradient checkpointing) or
        "nograd" (a rollout/eval forward)."""
        if kind not in ("train", "ckpt", "nograd"):
            raise ValueError(f"kind must be train, ckpt or nograd, got {kind!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        key = (kind, batch)
        if key not in self._cache:
            self._cache[key] = self._run(kind, batch)
        return self._cache[key]


@functools.lru_cache(maxsize=None)
def meter(
    family: str, config_path: str, resolution: int, text_tokens: int, dtype: str, lora: tuple | None
) -> TransformerMeter:
    """One meter per model and shape within a process (building the model costs a few seconds)."""
    config = json.loads(Path(config_path).read_text())
    return TransformerMeter(
        family, config, resolution=resolution, text_tokens=text_tokens, dtype=dtype, lora=lora
    )


@functools.lru_cache(maxsize=None)
def vae_decode(facts, config_path: str, resolution: int, dtype: str, batch: int) -> tuple[int, int, int]:
    """(parameters of the VAE, peak bytes of one no-grad decode of ``batch`` latents at ``resolution``
    plus the policy's fp32 images, FLOPs of that decode), for the family's ``facts`` (a ``FamilyPlan``:
    its VAE class and latents)."""
    import diffusers
    from torch._subclasses.fake_tensor import FakeTensorMode

    cls = getattr(diffusers, facts.vae_class)
    config = json.loads(Path(config_path).read_text())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    vae = to_fake(build(cls, config, DTYPES[dtype]), mode).eval()
    n_params = sum(p.numel() for p in vae.parameters())
    with mode, torch.device("cpu"), torch.no_grad(), LiveBytes(list(vae.parameters())) as live:
        z = facts.vae_latents(config, resolution, batch, DTYPES[dtype])
        img = vae.decode(z, return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0.0, 1.0)  # what DiffusersPolicy._vae_decode returns
        del img, z
    return n_params, live.peak, live.flops["forward"]
