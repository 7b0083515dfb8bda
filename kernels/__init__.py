"""Fused Triton kernels of fastcps (installed as fastcps.kernels). No model, no config."""
