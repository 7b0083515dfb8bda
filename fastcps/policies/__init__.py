"""Policy adapters, built from ``PolicyConfig``. Only this layer touches diffusers internals."""

from __future__ import annotations

import torch

from fastcps.policies.base import Cond, Policy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_policy(cfg, device) -> Policy:
    """``cfg`` is a ``fastcps.config.PolicyConfig``."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name == "toy":
        from fastcps.policies.toy import ToyDigitsPolicy

        if cfg.lora is not None:
            raise ValueError("policy.lora: the toy policy trains all of its 0.47M parameters; set policy.lora to null")
        return ToyDigitsPolicy(cfg.pretrained or None, device=device, dtype=dtype)
    raise NotImplementedError(
        f"policy.name = {cfg.name!r}: the FLUX and SD3 adapters are not in this release yet; "
        "only 'toy' can be trained (see the README's status section)"
    )


__all__ = ["Cond", "Policy", "build_policy", "DTYPES"]
