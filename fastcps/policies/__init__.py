"""Policy adapters, built from ``PolicyConfig``. Only this layer touches diffusers internals."""

from __future__ import annotations

from fastcps.policies.base import Cond, Policy
from fastcps.runtime import DTYPES


def build_policy(cfg, device, zero_stage: int = 0) -> Policy:
    """``cfg`` is a ``fastcps.config.PolicyConfig``; ``zero_stage`` is the DeepSpeed ZeRO stage the
    trainer will use (3: the FLUX/SD3 transformer stays on the CPU until the trainer partitions it;
    the toy is small enough to go to the device whole)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name == "toy":
        from fastcps.policies.toy import ToyDigitsPolicy

        policy = ToyDigitsPolicy(cfg.pretrained or None, device=device, dtype=dtype)
        if (
            cfg.lora is not None
        ):  # the toy trains all 0.47M parameters by default; LoRA exercises the FLUX path
            policy.add_lora(cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
        return policy
    if cfg.name in ("flux", "sd3"):
        if cfg.name == "flux":
            from fastcps.policies.flux import FluxPolicy as cls
        else:
            from fastcps.policies.sd3 import SD3Policy as cls
        policy = cls(cfg, device=device, zero_stage=zero_stage)
        if cfg.lora is not None:  # None = full fine-tuning
            policy.add_lora(cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
        return policy
    raise NotImplementedError(f"policy.name = {cfg.name!r}: choose toy, flux or sd3")


__all__ = ["Cond", "Policy", "build_policy", "DTYPES"]
