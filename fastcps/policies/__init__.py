"""Policy adapters, built from ``PolicyConfig``. Only this layer touches diffusers internals."""

from __future__ import annotations

from fastcps.policies.base import Cond, Policy
from fastcps.policies.families import FAMILIES, Family, family
from fastcps.runtime import DTYPES


def build_policy(cfg, device, zero_stage: int = 0) -> Policy:
    """``cfg`` is a ``fastcps.config.PolicyConfig``; ``zero_stage`` is the DeepSpeed ZeRO stage the
    trainer will use (3: a diffusers transformer stays on the CPU until the trainer partitions it;
    the toy is small enough to go to the device whole)."""
    dtype = DTYPES[cfg.dtype]
    try:
        cls = family(cfg.name).policy_class()
    except KeyError as err:
        raise NotImplementedError(err.args[0]) from None
    if cfg.name == "toy":
        policy = cls(cfg.pretrained or None, device=device, dtype=dtype)
        # the toy trains all 0.47M parameters by default; LoRA exercises the FLUX path
    else:
        policy = cls(cfg, device=device, zero_stage=zero_stage)
    if cfg.lora is not None:  # None = full fine-tuning
        policy.add_lora(cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    return policy


__all__ = ["Cond", "Policy", "build_policy", "DTYPES", "FAMILIES", "Family", "family"]
