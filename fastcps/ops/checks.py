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
        raise ValueError(
            f"argument '{name}' must have shape (B, ...) with at least one non-batch dim, "
            f"got shape {tuple(t.shape)}"
        )
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(
                f"argument '{name}' has shape {tuple(t.shape)} but '{ref_name}' has shape "
                f"{tuple(ref.shape)}; they must match"
            )
        if t.device != ref.device:
            raise ValueError(
                f"argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                "move them to the same device"
            )
    return t


def check_coeff(name: str, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sample coefficient as a contiguous (B,) fp32 tensor on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"coefficient '{name}' must be a (B,) tensor, got {type(t).__name__}")
    if t.numel() == 1 and batch != 1:
        t = t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"coefficient '{name}' must have shape ({batch},) (one per sample), got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"coefficient '{name}' is on {t.device} but the latents are on {device}")
    return t.to(torch.float32).contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N) with unit stride along N (copies only when the layout needs it)."""
    rows = t.reshape(t.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def check_op_inputs(op: str, x: torch.Tensor, latents: dict, coeffs: dict) -> None:
    """Checks that the ``torch.ops.fastcps`` operators run in their real and fake kernels alike.

    The public wrappers have already given the friendlier errors above; these stop a direct caller
    of the operator (or a fake CUDA run mixing in a CPU tensor) before a kernel reads a wrong
    pointer: (B, N) latents with unit inner stride on ``x``'s device, (B,) contiguous fp32
    coefficients there too. Plain comparisons (a few microseconds per call): on symbolic shapes
    they become guards.
    """
    shape, device = x.shape, x.device
    if len(shape) != 2:
        raise ValueError(f"{op}: 'x' must be (B, N) rows, got shape {tuple(shape)}")
    for name, t in {"x": x, **latents}.items():
        if t is None:
            continue
        if t.device != device:
            raise ValueError(
                f"{op}: '{name}' is on {t.device} but 'x' is on {device}; move them to the same device"
            )
        if t.shape != shape:
            raise ValueError(
                f"{op}: '{name}' has shape {tuple(t.shape)}, 'x' has {tuple(shape)}; they must match"
            )
        if shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{op}: '{name}' needs unit stride along N (see fastcps.ops.checks.as_rows)")
    for name, c in coeffs.items():
        if (
            c.device != device
            or c.dtype != torch.float32
            or c.shape != shape[:1]
            or (shape[0] > 1 and c.stride(0) != 1)
        ):
            raise ValueError(
                f"{op}: coefficient '{name}' is {c.dtype} {tuple(c.shape)} on {c.device}; it must "
                f"be contiguous float32 ({shape[0]},) on {device}, like 'x'"
            )
