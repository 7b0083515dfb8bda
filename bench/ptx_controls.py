"""Negative controls for bench/ptx_report.py: two small kernels its checks must flag.

- ``control_strided_load``: a masked load at stride 2 (``x[2·i]``), which cannot be a 16-byte vector
  load: PTX ``ld.global.b32`` and SASS ``LDG.E`` for a latent tensor (the "narrow load" failure).
- ``control_spill``: 16 loaded blocks summed with ``maxnreg=24``, which forces ptxas to spill
  registers to local memory (STL/LDL in the SASS, a stack frame in the cubin).

They are compiled by the same code as the real variants (``ptx_report.py --controls``), so a scanner
that stopped seeing spills or narrow loads would fail tests/test_ptx_report.py. Imported only in a
process without TRITON_INTERPRET (the report's child processes): ``@triton.jit`` must give a
compilable JITFunction.

``cosine_ptx()`` compiles ``tl.cos`` (libdevice's cosf) and cps_step's ``_cosf_fast_path`` side by
side: the test compares the fp32 constants of the two PTXs (the seeded noise is ``tl.randn`` bit for
bit only while they agree) and that only libdevice's has local memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastcps.kernels.cps_step import _cosf_fast_path

_BLOCK = 512
_SPILL_BLOCKS = 16


@triton.jit
def _strided_load_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(y_ptr + offs, tl.load(x_ptr + 2 * offs, mask=mask), mask=mask)


@triton.jit
def _spill_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr, K: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(x_ptr + offs + k * N, mask=mask) * (k + 1)
    tl.store(y_ptr + offs, acc, mask=mask)


@triton.jit
def _cos_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if LIBDEVICE:
        y = tl.cos(x)
    else:
        y = _cosf_fast_path(x)
    tl.store(y_ptr + offs, y, mask=mask)


def cosine_ptx() -> dict:
    """{'libdevice': PTX of tl.cos, 'fast_path': PTX of cps_step's _cosf_fast_path}, sm_90."""
    from ptx_report import _compile

    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr", "LIBDEVICE": "constexpr"}
    options = {"num_warps": 4, "enable_fp_fusion": True}
    return {
        name: _compile(_cos_kernel, sig, {"BLOCK": _BLOCK, "LIBDEVICE": lib}, options).asm["ptx"]
        for name, lib in (("libdevice", True), ("fast_path", False))
    }


def control_variants():
    """(name, kernel, signature, constexprs, compile options), as ptx_report's own variants."""
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"}
    options = {"num_warps": 4, "enable_fp_fusion": True}
    return [
        ("control_strided_load", _strided_load_kernel, sig, {"BLOCK": _BLOCK}, options),
        (
            "control_spill",
            _spill_kernel,
            {**sig, "K": "constexpr"},
            {"BLOCK": _BLOCK, "K": _SPILL_BLOCKS},
            {**options, "maxnreg": 24},
        ),
    ]
