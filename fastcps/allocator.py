"""The CUDA caching allocator's settings for the entry points that train (``fastcps.train``,
``fastcps.gpucheck``).

Why expandable segments: a training step allocates tens of GiB of activations of many sizes and frees
them again in another order, every micro-step; the caching allocator keeps the freed blocks in fixed
segments, and a later, larger request can find no segment to fit although the free bytes add up
("reserved but unallocated" in its OOM message: 1.83 GiB at the OOM of a 79 GiB card in
vllm-project/compressed-tensors#587, ~20 GiB in a GRPO trainer on B200 in NovaSky-AI/SkyRL#1768).
``expandable_segments:True`` maps more physical memory into one growing segment instead (PyTorch's CUDA
semantics notes, "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF"; pytorch/pytorch#96995), which
is what PyTorch's own OOM message recommends. The allocator reads the variable when CUDA initialises, so
it is set before any CUDA call, and never over a value the user set (``PYTORCH_CUDA_ALLOC_CONF`` or
torch's newer ``PYTORCH_ALLOC_CONF``, which wins over it).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

#: the variables the caching allocator reads (torch 2.9+: PYTORCH_ALLOC_CONF first; ROCm builds' own)
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"


def supported() -> bool:
    """Expandable segments need a CUDA build on Linux (cuMemMap; PyTorch's own expandable-segment tests
    skip Windows, Jetson and ROCm)."""
    import torch

    return sys.platform.startswith("linux") and torch.version.cuda is not None and torch.version.hip is None


def enable_expandable_segments(environ=None) -> str | None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` in ``environ`` (default ``os.environ``)
    unless an allocator setting is already there or the build does not support it. Returns the value
    set, or None when it left the environment as it was. Call it before CUDA initialises: the
    allocator reads its settings once."""
    env = os.environ if environ is None else environ
    if any(name in env for name in ALLOC_CONF_VARS) or not supported():
        return None
    import torch

    if torch.cuda.is_initialized():  # too late for this process: the allocator has read its settings
        log.warning("CUDA is already initialised: %s not set (set it in the environment instead)", EXPANDABLE)
        return None
    env["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE
    return EXPANDABLE
