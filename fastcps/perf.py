"""Utilisation in the logs: ``perf/tflops`` and ``perf/mfu`` per phase, from the FLOPs the trainer's own
transformer calls cost.

:class:`FlopLedger` wraps the policy's ``velocity`` and the engine's ``backward`` of a running trainer.
The first call of each kind (grad mode, samples) and the first backward of each minibatch size run
under :class:`FlopCount` (the FLOP formulas ``torch.utils.flop_counter`` has, including the attention
kernels ``fastcps.plan.measure`` registers, DeepSpeed's hooks, the LoRA adapters, gradient checkpointing's
re-forward inside the backward); later calls are counted on the host and priced from that first
measurement. No device value is read, nothing is added to the hot loop but a dictionary update.

Peak FLOP/s: the dense bf16 figure of the device's datasheet (``PEAK_BF16_TFLOPS``, matched on the
CUDA device name); elsewhere (CPU, an unknown GPU) no ``perf/mfu`` is logged, ``perf/tflops`` is.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastcps.plan import measure  # noqa: F401 - registers the CPU attention kernels' FLOP formulas

# dense bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets (without sparsity)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0,
    "B200": 2250.0,
    "GB200": 2500.0,
}


def peak_tflops(device) -> float | None:
    """The device's dense bf16 peak (TFLOP/s), or None where it is not known (the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


class FlopCount(TorchDispatchMode):
    """FLOPs of every op with a formula in ``torch.utils.flop_counter.flop_registry`` (what
    ``FlopCounterMode`` counts, without its module hooks: nothing here touches DeepSpeed's)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class FlopLedger:
    """Counts the transformer's calls per phase and prices them (see the module docstring). Set
    ``phase`` ("rollout", "update", "eval") before each part of the epoch; ``take()`` returns the
    FLOPs per phase since the last ``take()`` and starts again."""

    def __init__(self, policy, engine):
        self.phase = "rollout"
        self.forward_cost: dict[tuple, int] = {}  # (grad, samples) -> FLOPs of one call
        self.backward_cost: dict[int, int] = {}  # samples -> FLOPs of one backward (re-forward included)
        self.counts: Counter = Counter()  # (phase, "forward" | "backward", grad, samples) -> calls
        self._pending: list[int] = []
        self._velocity, self._backward = policy.velocity, engine.backward
        policy.velocity = self.velocity
        engine.backward = self.backward

    def velocity(self, model, latents, sigma, cond):
        key = (torch.is_grad_enabled(), int(latents.shape[0]))
        if key not in self.forward_cost:
            with FlopCount() as fc:
                out = self._velocity(model, latents, sigma, cond)
            self.forward_cost[key] = fc.flops
        else:
            out = self._velocity(model, latents, sigma, cond)
        self.counts[(self.phase, "forward") + key] += 1
        if key[0]:
            self._pending.append(key[1])
        return out

    def backward(self, loss, *args, **kwargs):
        samples = sum(self._pending)
        self._pending = []
        if samples and samples not in self.backward_cost:
            with FlopCount() as fc:
                out = self._backward(loss, *args, **kwargs)
            self.backward_cost[samples] = fc.flops
        else:
            out = self._backward(loss, *args, **kwargs)
        if samples:
            self.counts[(self.phase, "backward", True, samples)] += 1
        return out

    def take(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (phase, what, grad, samples), n in self.counts.items():
            cost = (
                self.forward_cost[(grad, samples)]
                if what == "forward"
                else self.backward_cost.get(samples, 0)
            )
            out[phase] = out.get(phase, 0.0) + n * cost
        self.counts.clear()
        return out


class GatherMeter:
    """ZeRO-3's parameter all-gathers per phase, counted where DeepSpeed starts them: each partitioned
    parameter's ``all_gather_coalesced`` (the prefetcher and the fetch before a module runs,
    runtime/zero/partitioned_param_coordinator.py ``__all_gather_params_``) and ``all_gather``
    (``GatheredParameters``), wrapped on the parameter itself. What DeepSpeed keeps between uses
    (``stage3_max_reuse_distance``, the prefetch, persistence) is not gathered and not counted, so
    ``take()`` is the traffic the run really made, not a formula. Host-side sums only, nothing is
    read from the device. ``phase_of()`` names the phase a gather belongs to."""

    def __init__(self, module: torch.nn.Module, phase_of, world: int):
        self.phase_of, self.ring = phase_of, (world - 1) / world
        self.elements: Counter = Counter()  # phase -> elements gathered
        self.bytes: Counter = Counter()  # phase -> bytes gathered (whole tensors, before the ring factor)
        params = [p for p in module.parameters() if hasattr(p, "ds_tensor") and not p.ds_persist]
        self.partitioned = sum(int(p.ds_numel) for p in params)  # elements of one whole-model gather
        for p in params:
            p.all_gather_coalesced = self._wrap(p.all_gather_coalesced, lambda a, kw: a[0])
            p.all_gather = self._wrap(p.all_gather, self._param_list(p))

    @staticmethod
    def _param_list(param):
        """``param.all_gather(param_list=None, ...)``'s parameters: the list given, else ``param``."""
        return lambda args, kwargs: kwargs.get("param_list") or (args[0] if args and args[0] else [param])

    def _wrap(self, gather, params_of):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        def counted(*args, **kwargs):
            params = [
                p
                for p in params_of(args, kwargs)  # what this call moves: DeepSpeed skips the rest
                if not p.ds_persist and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
            ]
            numel = sum(int(p.ds_numel) for p in params)
            width = (
                1 if kwargs.get("quantize") else None
            )  # ZeRO++ quantized weights travel as int8 (+ scales)
            phase = self.phase_of()
            self.elements[phase] += numel
            self.bytes[phase] += sum(int(p.ds_numel) * (width or p.ds_tensor.element_size()) for p in params)
            return gather(*args, **kwargs)

        return counted

    def take(self) -> dict[str, float]:
        """``zero/<phase>_gathers`` (whole-model gathers: elements / the partitioned elements) and
        ``zero/<phase>_gathered_gb`` (GB received per GPU on a ring) per phase since the last call."""
        out = {}
        for phase, n in self.elements.items() if self.partitioned else ():
            out[f"zero/{phase}_gathers"] = n / max(self.partitioned, 1)
            out[f"zero/{phase}_gathered_gb"] = self.bytes[phase] * self.ring / 1e9
        self.elements.clear()
        self.bytes.clear()
        return out


def metrics(
    flops: dict[str, float], seconds: dict[str, float], peak: float | None, total: bool = True
) -> dict[str, float]:
    """``perf/<phase>_tflops`` (this rank's counted FLOPs / the phase's wall time), ``perf/tflops`` over
    the phases given (with ``total``), and the ``_mfu`` beside each when the device's peak is known."""
    out = {}
    rows = [(k, flops.get(k, 0.0), v) for k, v in seconds.items()]
    if total:
        rows.append(("", sum(f for _, f, _ in rows), sum(seconds.values())))
    for name, f, s in rows:
        key = f"perf/{name}_tflops" if name else "perf/tflops"
        out[key] = f / max(s, 1e-9) / 1e12
        if peak:
            out[key.replace("_tflops", "_mfu").replace("perf/tflops", "perf/mfu")] = out[key] / peak
    return out
