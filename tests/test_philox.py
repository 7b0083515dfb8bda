"""fastcps.ops.philox.philox_randn reproduces Triton's tl.randn (checked under the interpreter)."""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from fastcps.ops.philox import philox_randint4x, philox_randn

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)


@triton.jit
def _randn_kernel(out_ptr, words_ptr, seed, off_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    off = tl.load(off_ptr + o, mask=m, other=0)
    tl.store(out_ptr + o, tl.randn(seed, off), mask=m)
    a, b, c, d = tl.randint4x(seed, off)
    tl.store(words_ptr + 4 * o + 0, a.to(tl.int32, bitcast=True), mask=m)
    tl.store(words_ptr + 4 * o + 1, b.to(tl.int32, bitcast=True), mask=m)
    tl.store(words_ptr + 4 * o + 2, c.to(tl.int32, bitcast=True), mask=m)
    tl.store(words_ptr + 4 * o + 3, d.to(tl.int32, bitcast=True), mask=m)


def _triton(seed, offs):
    n = offs.numel()
    out = torch.empty(n, dtype=torch.float32)
    words = torch.empty(n, 4, dtype=torch.int32)
    _randn_kernel[(1,)](out, words, seed, offs, n, BLOCK=triton.next_power_of_2(n))
    return out, words


# around 2**31 (int32 sign) and 2**32 (hi word into the second counter), and far beyond
_EDGE = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 3 * 2**33 + 1, 2**62 + 11]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31 + 5, 2**40 + 77, -3])
def test_matches_tl_randn(seed):
    offs = torch.cat([torch.arange(0, 120), torch.tensor(_EDGE)]).long()
    out, words = _triton(seed, offs)
    mine = torch.stack(philox_randint4x(seed, offs), 1)
    mine32 = torch.where(mine >= 2**31, mine - 2**32, mine).to(torch.int32)
    assert torch.equal(mine32, words), "Philox words differ from Triton's"
    ref = philox_randn(seed, offs)
    assert ref.dtype == torch.float32 and ref.shape == offs.shape
    # the words are exact; log/cos are library calls (numpy here, libdevice on GPU): ulp-level
    torch.testing.assert_close(ref, out, rtol=0, atol=1e-6)


def test_hi_word_matters_and_counters_distinct():
    a = philox_randn(7, torch.tensor([5, 5 + 2**32, 5 + 2**33]))
    assert len(set(a.tolist())) == 3
    assert not torch.equal(philox_randn(7, torch.arange(64)), philox_randn(8, torch.arange(64)))


def test_int32_offsets_equal_int64_below_2_32():
    offs = torch.arange(1000, 1100)
    assert torch.equal(philox_randn(3, offs.int()), philox_randn(3, offs))


def test_statistics():
    z = philox_randn(2024, torch.arange(200_000))
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1.0) < 0.01
    assert bool(torch.isfinite(z).all())


def test_bad_seed_and_offsets_name_the_problem():
    offs = torch.arange(3)
    for seed, error, message in [
        (2**63, ValueError, "seed must fit in int64 (the kernel argument's type), got 9223372036854775808"),
        (
            -(2**63) - 1,
            ValueError,
            "seed must fit in int64 (the kernel argument's type), got -9223372036854775809",
        ),
        (1.5, TypeError, "seed must be a Python int, got float"),
        (True, TypeError, "seed must be a Python int, got bool"),
    ]:
        with pytest.raises(error, match="^" + re.escape(message) + "$"):
            philox_randn(seed, offs)
    with pytest.raises(TypeError, match=r"^offsets must be an int64 \(or int32\) tensor, got torch.float32$"):
        philox_randn(1, offs.float())
    for seed in (-(2**63), 2**63 - 1):  # the int64 edges are seeds like any other
        torch.testing.assert_close(philox_randn(seed, offs), _triton(seed, offs)[0], rtol=0, atol=1e-6)


def test_uniform_float_at_the_sign_edge():
    """Triton's uint_to_uniform_float bitcasts to int32 and flips negative words (x < 0 -> ~x): the
    words 2**31 - 1 and 2**31 map to the same float, 2**32 - 1 to 0."""
    from fastcps.ops.philox import _uint_to_uniform_float

    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    as_int32 = torch.where(words >= 2**31, words - 2**32, words)
    flipped = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    want = flipped.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    assert torch.equal(_uint_to_uniform_float(words), want)
    assert want[2] == want[3] and want[4] == 0


def test_kernel_seed_noise_is_philox_randn_and_tiling_independent():
    """cps_step_fwd(seed=...) draws tl.randn(seed, offset + b*N + n): same prev for any BLOCK/ITERS,
    and the CPU path's philox_randn gives the same noise."""
    from fastcps.kernels.cps_step import cps_step_fwd

    B, N, off = 3, 1000, 2**32 - 1500  # the counters cross 2**32 inside the batch
    x, v = torch.randn(B, N), torch.randn(B, N)
    zero, one = torch.zeros(B), torch.ones(B)
    p1, l1, _ = cps_step_fwd(x, v, zero, zero, one, one, zero, seed=99, offset=off)
    p2, l2, _ = cps_step_fwd(
        x, v, zero, zero, one, one, zero, seed=99, offset=off, block=64, iters=4, num_warps=1
    )
    assert torch.equal(p1, p2)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    eps = philox_randn(99, off + torch.arange(B * N).view(B, N))
    torch.testing.assert_close(p1, eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(l1, -(eps**2).mean(1), rtol=1e-5, atol=1e-6)


@pytest.fixture
def exact_fma(monkeypatch):
    """The interpreter's tl.fma computes x*y + z in fp32 (two roundings); the GPU's fma.rn rounds once."""
    from triton.runtime import interpreter

    def create_fma(self, x, y, z):
        return interpreter.TensorHandle(_exact_fma(x.data, y.data, z.data), z.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", create_fma)


@triton.jit
def _kernel_randn_kernel(out_ptr, ref_ptr, seed, off_ptr, n, BLOCK: tl.constexpr):
    from fastcps.kernels.cps_step import _randn

    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    off = tl.load(off_ptr + o, mask=m, other=0)
    tl.store(out_ptr + o, _randn(seed, off), mask=m)
    tl.store(ref_ptr + o, tl.randn(seed, off), mask=m)


def test_the_kernels_randn_is_tl_randn_over_the_whole_circle(exact_fma):
    """cps_step's _randn (tl.randn with a cosine free of libdevice's local-memory slow path) against
    tl.randn and philox_randn on 2**17 draws: every quadrant of the angle, the largest radii. (The
    interpreter's tl.cos is numpy's: ulp-level here; the bitwise check against libdevice is the next
    test.) fma is rounded once, as on the GPU."""
    n = 2**17
    offs = torch.arange(n, dtype=torch.long) + 2**32 - 7
    out, ref = torch.empty(n), torch.empty(n)
    _kernel_randn_kernel[(n // 4096,)](out, ref, 5, offs, n, BLOCK=4096)
    word = philox_randint4x(5, offs)[1]
    signed = torch.where(word >= 2**31, word - 2**32, word)
    theta = (torch.where(signed < 0, -signed - 1, signed) * 4.6566127342e-10).float() * 6.283185307179586
    assert theta.min() < 0.01 and theta.max() > 6.27  # the angle covers [0, 2π)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, philox_randn(5, offs), rtol=0, atol=1e-6)
    assert out.abs().max() > 4.0  # the large radii, where a cosine error is magnified most


def _f32(hexword: str):
    import numpy as np

    return np.frombuffer(bytes.fromhex(hexword)[::-1], dtype=np.float32)[0]


def _exact_fma(a, b, c):
    """fp32 fma rounded once: a*b is exact in float64, TwoSum keeps the error of + c, and a float64
    sum lying exactly half-way between two fp32 values is rounded by that error's sign."""
    import numpy as np

    a, b, c = (np.asarray(x, dtype=np.float32) for x in (a, b, c))
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = np.broadcast_to(c.astype(np.float64), p.shape)
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    lo = np.where(r.astype(np.float64) > s, np.nextafter(r, np.float32(-np.inf)), r)
    hi = np.where(r.astype(np.float64) < s, np.nextafter(r, np.float32(np.inf)), r)
    tie = (s - lo.astype(np.float64) == hi.astype(np.float64) - s) & (lo != hi) & (e != 0)
    return np.where(tie, np.where(e > 0, hi, lo), r)


def _libdevice_cosf(x):
    """__nv_cosf's fast path (|x| < 105615) as in the sm_90 PTX of tl.cos with Triton 3.8.0's libdevice:
    mul.f32 by 2/π, cvt.rni, three fma with a three-part π/2, the sin or cos polynomial, sign."""
    import numpy as np

    assert float(np.abs(x).max()) < 105615.0
    t = x * _f32("3F22F983")
    q = np.rint(t).astype(np.int32)  # cvt.rni: ties to even
    j = q.astype(np.float32)
    r = _exact_fma(j, _f32("BFC90FDA"), x)
    r = _exact_fma(j, _f32("B3A22168"), r)
    r = _exact_fma(j, _f32("A7C234C5"), r)
    z = r * r
    odd = (q & 1) != 0
    s = np.where(odd, r, np.float32(1.0))
    sz = _exact_fma(z, s, np.float32(0.0))
    p = np.where(odd, _f32("B94D4153"), _exact_fma(_f32("37CBAC00"), z, _f32("BAB607ED")))
    p = _exact_fma(p, z, np.where(odd, _f32("3C0885E4"), _f32("3D2AAABB")))
    p = _exact_fma(p, z, np.where(odd, _f32("BE2AAAA8"), _f32("BEFFFFFF")))
    res = _exact_fma(p, sz, s)
    return np.where(((q + 1) & 2) != 0, _exact_fma(res, np.float32(-1.0), np.float32(0.0)), res)


@triton.jit
def _cosf_kernel(th_ptr, out_ptr, n, BLOCK: tl.constexpr):
    from fastcps.kernels.cps_step import _cosf_fast_path

    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(out_ptr + o, _cosf_fast_path(tl.load(th_ptr + o, mask=m, other=0.0)), mask=m)


def test_the_kernels_cosine_is_libdevice_cosf_bit_for_bit(exact_fma):
    """cps_step's _cosf_fast_path, run by the interpreter with fma rounded once as on the GPU, equals
    libdevice's cosf fast path bit for bit on angles tl.randn draws: random ones, the four where
    t = th·2/π is exactly half-way (rint's ties to even decide the quadrant) and their neighbours."""
    import numpy as np

    words = np.random.default_rng(0).integers(0, 2**31, 2**16)
    words = np.concatenate([words, [0, 1, 2**31 - 1, 268435488, 805306432, 1342177408, 1879048320]])
    th = np.float32(6.283185307179586) * (words.astype(np.float32) * np.float32(4.6566127342e-10))
    ties = np.array([1061752795, 1075235812, 1081824210, 1085271520], dtype=np.int32)
    assert np.all(th.view(np.int32)[-4:] == ties[[0, 1, 2, 3]])  # the words above draw these angles
    t = ties.view(np.float32) * _f32("3F22F983")
    assert np.all(t == np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32))
    th = np.concatenate([th, (ties[:, None] + np.arange(-2, 3)).ravel().view(np.float32)])
    out = torch.empty(th.size)
    _cosf_kernel[(triton.cdiv(th.size, 4096),)](torch.from_numpy(th), out, th.size, BLOCK=4096)
    want = _libdevice_cosf(th)
    differ = np.flatnonzero(out.numpy().view(np.int32) != want.view(np.int32))
    assert differ.size == 0, (th[differ[:5]], out.numpy()[differ[:5]], want[differ[:5]])
    assert np.abs(want.astype(np.float64) - np.cos(th.astype(np.float64))).max() < 1e-7
