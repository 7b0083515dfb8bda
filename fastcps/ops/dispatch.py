"""Which implementation runs an op: Triton on CUDA tensors, a fused CPU path on CPU tensors.

``FASTCPS_IMPL=triton|torch|auto`` overrides the choice. ``triton`` on CPU tensors runs Triton's
interpreter, which is for tests only (≈ numpy speed per block), so it must be asked for explicitly
with ``TRITON_INTERPRET=1`` set before the kernels are imported.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

IMPLS = ("auto", "triton", "torch")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_impl(t: torch.Tensor) -> str:
    """'triton' or 'torch' for an op whose inputs live on ``t``'s device."""
    want = os.environ.get("FASTCPS_IMPL", "auto").strip().lower() or "auto"
    if want not in IMPLS:
        raise ValueError(f"FASTCPS_IMPL must be one of {IMPLS}, got {want!r}")
    if want == "torch":
        return "torch"
    if want == "triton":
        if not _triton_available():
            raise RuntimeError("FASTCPS_IMPL=triton but triton is not installed (pip install triton)")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "FASTCPS_IMPL=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before fastcps.kernels is imported (tests only; it is slow), or use FASTCPS_IMPL=auto"
            )
        return "triton"
    return "triton" if t.is_cuda and _triton_available() else "torch"


_COMPILE_FAILED: set[str] = set()


def maybe_compile(fn):
    """``torch.compile`` ``fn`` for the CPU path; on any compile error fall back to eager, once, loudly.

    Compilation happens on the first call for each new shape/dtype (``dynamic=None`` lets inductor
    generalise after the second shape), so steady-state calls cost one fused loop per tensor pass.
    ``FASTCPS_COMPILE=0`` turns it off (eager reference math). Tensors smaller than
    ``FASTCPS_COMPILE_MIN_NUMEL`` (default 2^18 elements, a quarter of one FLUX latent batch) run
    eager too: each new graph costs ~10-20 s of inductor time on 2 cores, which the toy's 16K-element
    latents never earn back (eager costs them tens of microseconds). Inside a graph being traced by
    torch.compile it is the plain function (no nested compile); the operators' bodies are opaque to
    tracing and run it only on real tensors.
    """
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if (
            torch.compiler.is_compiling()
            or os.environ.get("FASTCPS_COMPILE", "1") == "0"
            or fn.__name__ in _COMPILE_FAILED
            or args[0].numel() < int(os.environ.get("FASTCPS_COMPILE_MIN_NUMEL", 1 << 18))
        ):
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=None, fullgraph=True)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # inductor needs a C++ compiler; anything else, we still must run
            _COMPILE_FAILED.add(fn.__name__)
            warnings.warn(
                f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                "using eager PyTorch for it from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args, **kwargs)

    return wrapper
