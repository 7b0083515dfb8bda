"""Triton's ``tl.randn(seed, offset)`` in plain PyTorch, bit for bit in its integer part.

The CPU path of the rollout step uses this when the user gives a ``seed``, so that one seed gives the
same noise on CPU and on GPU (``kernels/cps_step.py`` draws ``tl.randn(seed, offset + b*N + n)``).

What is reproduced, from ``triton/language/random.py`` (Triton 3.x):

- ``randint4x``: counter ``(c0, c1, c2, c3) = (lo32(offset), hi32(offset), 0, 0)`` for an int64
  offset, key ``(lo32(seed), hi32(seed))``, 10 Philox-4x32 rounds.
- ``uint_to_uniform_float``: bitcast to int32, ``x < 0 -> ~x``, times ``4.6566127342e-10`` in fp32.
- ``pair_uniform_to_normal`` (Box-Muller, first output): ``u1 = max(1e-7, u1)``,
  ``sqrt(-2 log u1) * cos(2π u2)`` in fp32.

uint32 arithmetic is emulated in int64 tensors with ``& 0xFFFFFFFF`` masks; the 32x32 -> 64-bit
products are split in 16-bit halves so that no intermediate leaves int64's range. The Philox words
are exact; the final log/cos are library calls on both sides and may differ by an ulp or so from
CUDA's (libdevice) or the interpreter's (numpy) versions (measured: max |diff| 3.6e-7 vs the
interpreter, ~75% of values bit-identical).
"""

from __future__ import annotations

import torch

__all__ = ["philox_randint4x", "philox_randn"]

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(umulhi(const, x), const*x mod 2**32) for uint32 values held in int64."""
    # const * x < 2**64 overflows int64, so multiply by the 16-bit halves of const:
    # const*x = (ch*2**16 + cl)*x = ch*x*2**16 + cl*x, each partial product < 2**48.
    ch, cl = const >> 16, const & 0xFFFF
    p_hi = ch * x  # < 2**48
    p_lo = cl * x  # < 2**48
    # full = p_hi*2**16 + p_lo; split p_hi at 16 bits to stay within int64.
    lo = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2**32 + 2**48
    hi = (p_hi >> 16) + (lo >> 32)
    return hi & _M32, lo & _M32


def philox_randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Triton's ``randint4x(seed, offsets)`` for int64 offsets: four uint32 words held in int64."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in int64 (the kernel argument's type), got {seed}")
    offsets = torch.as_tensor(offsets)
    if offsets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"offsets must be an int64 (or int32) tensor, got {offsets.dtype}")
    off = offsets.to(torch.int64)
    # Triton: offset_lo = offset.to(uint32) (low word); offset_hi = (offset >> 32).to(uint32) only for
    # 64-bit offsets; an int32 offset tensor has hi = 0, and so does an int64 one below 2**32.
    c0 = off & _M32
    c1 = (off >> 32) & _M32 if offsets.dtype == torch.int64 else torch.zeros_like(off)
    c2 = torch.zeros_like(off)
    c3 = torch.zeros_like(off)
    # seed.to(uint64) sign-extends a negative int: Python's two's-complement shifts agree.
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    # bitcast uint32 -> int32; negatives map to ~x = -x - 1, i.e. 2**32 - 1 - x as uint32... in int32
    # terms ~(x - 2**32) = 2**32 - 1 - x, which lies in [0, 2**31).
    x = torch.where(x >= 2**31, _M32 - x, x)
    # int32 -> fp32 rounds to nearest even (cvt.rn), then one fp32 multiply.
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offsets)`` of Triton as an fp32 tensor of ``offsets``' shape and device."""
    i1, i2, _, _ = philox_randint4x(seed, offsets)
    u1 = _uint_to_uniform_float(i1)
    u2 = _uint_to_uniform_float(i2)
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = u2 * torch.tensor(6.283185307179586, dtype=torch.float32)
    # log and cos in fp64 then rounded: the correctly rounded fp32 value, which CUDA's libdevice
    # (<= 1-2 ulp) and numpy (the interpreter) hit more often than torch's own fp32 kernels do.
    r = torch.sqrt(-2.0 * torch.log(u1.double()).to(torch.float32))
    return r * torch.cos(th.double()).to(torch.float32)
