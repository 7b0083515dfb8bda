"""Fake-tensor machinery of the plan's measurements (``fastcps.plan.measure``): a model built on the
``meta`` device from its config (LoRA added as ``Policy.add_lora`` adds it), its parameters swapped for
fake tensors, and :class:`LiveBytes`, the dispatch mode that counts live bytes and FLOPs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

# Attention kernels whose FLOPs torch 2.14's counter misses: it has formulas for the CUDA kernels only,
# so on fake CPU tensors (where the plan measures) a FLUX.1-dev forward at 512 px / 512 text tokens
# lost its 57 attention calls (1.65 of 21.84 TFLOP). Torch 2.15 counts them itself (its own formula
# stays); older releases get torch's own sdpa formulas registered here for the same shapes, so the
# figure is the same whichever torch runs the plan.
_ATTENTION_WITHOUT_FORMULA = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)


def _register_attention_flop_formulas() -> list[str]:
    """Add torch's own sdpa forward/backward formulas for the attention ops the registry lacks;
    returns the names added (empty where torch counts them already)."""
    from torch.utils import flop_counter

    added = []
    for name in _ATTENTION_WITHOUT_FORMULA:
        for op, formula in (
            (name, flop_counter.sdpa_flop),
            (f"{name}_backward", flop_counter.sdpa_backward_flop),
        ):
            packet = getattr(torch.ops.aten, op, None)
            if packet is not None and packet not in flop_registry:
                flop_registry[packet] = formula  # the registry FlopCounterMode reads too
                added.append(op)
    return added


_register_attention_flop_formulas()


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the mode (``current``, ``peak``) and FLOPs per
    ``phase`` (set ``tracker.phase`` between calls). Storages of ``exclude`` (e.g. a model's
    parameters) are never counted, not even through views."""

    def __init__(self, exclude=()):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        for t in exclude:
            self._seen[t.untyped_storage()] = 0
        self.current = self.peak = 0
        self.phase = "forward"
        self.flops: Counter[str] = Counter()

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.phase] += formula(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st in self._seen:
                    continue
                n = st.nbytes()
                self._seen[st] = n
                weakref.finalize(st, self._free, n)
                self.current += n
                self.peak = max(self.peak, self.current)
        return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(
    cls, config: dict, dtype: torch.dtype = torch.bfloat16, lora: tuple | None = None, device: str = "meta"
):
    """``cls.from_config(config)`` on ``device`` (meta: shapes only) in ``dtype``; with ``lora = (r, alpha,
    targets)`` the model is frozen and peft adapters are added (trainable), as ``Policy.add_lora`` does."""
    with torch.device(device), default_dtype(dtype):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        if lora is not None:
            from peft import LoraConfig

            r, alpha, targets = lora
            names = [n for n, _ in model.named_modules()]
            present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
            if not present:
                raise ValueError(
                    f"policy.lora.target_modules {list(targets)} match no module of {cls.__name__}"
                )
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=present))
    return model


def to_fake(model: torch.nn.Module, mode, device: str = "cpu") -> torch.nn.Module:
    """Replace every meta parameter and buffer by a fake tensor on ``device``, in place. (Moving a
    module that already holds fake tensors with ``.to`` fails in ``swap_tensors``, hence meta first.)"""
    conv = mode.fake_tensor_converter
    dev = torch.device(device)
    for mod in model.modules():
        for k, p in mod._parameters.items():
            if p is not None:
                mod._parameters[k] = torch.nn.Parameter(
                    conv.from_meta_and_device(mode, p.data, dev), requires_grad=p.requires_grad
                )
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = conv.from_meta_and_device(mode, b, dev)
    return model
