"""Input validation shared by the ops: errors name the argument, the shape or dtype, and the fix."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_latent(name: str, t, ref: torch.Tensor | None = None, ref_name: str = "sample") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"argument '{name}' has dtype {t.dtype}; expected float32, bfloat16 or float16")
    if t.ndim < 2:
        raise ValueError(f"argument '{name}' must have shape (B, ...) with at least one non-batch dim, "
                         f"got shape {tuple(t.shape)}")
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(f"argument '{name}' has shape {tuple(t.shape)} but '{ref_name}' has shape "
                             f"{tuple(ref.shape)}; they must match")
        if t.device != ref.device:
            raise ValueError(f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                             "move them to the same device")
    return t


def check_coeff(name: str, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sample coefficient as a contiguous (B,) fp32 tensor on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"coefficient '{name}' must be a (B,) tensor, got {type(t).__name__}")
    if t.numel() == 1 and batch != 1:
        t = t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"coefficient '{name}' must have shape ({batch},) (one per sample), "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"coefficient '{name}' is on {t.device} but the latents are on {device}")
    return t.to(torch.float32).contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N) with unit stride along N (copies only when the layout needs it)."""
    rows = t.reshape(t.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows
