"""The rollout step op against the float64 oracle (tests/oracle.py): the Triton kernel through the
interpreter, and the eager CPU path. The compiled CPU path users run is in tests/test_cpu_compiled.py."""

import math
import re
import zlib

import pytest
import torch

from fastcps import cps_step, cps_step_ref, step_coeffs
from fastcps.ops.cps_step import StepResult
from oracle import assert_step_close

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def stable_seed(*key) -> int:
    """A per-case seed that is the same in every run (``hash()`` of a str changes with PYTHONHASHSEED)."""
    return zlib.crc32(repr(key).encode())


def coeffs_for(batch, sampler="cps", last=False, eta=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma = 0.15 + 0.8 * torch.rand(batch, generator=g)
    sigma_next = torch.zeros(batch) if last else sigma * (0.3 + 0.6 * torch.rand(batch, generator=g))
    return step_coeffs(sampler, sigma, sigma_next, eta)


def case_coeffs(case, batch):
    """mid: a cps step; last: σ' = 0 (s = 0); eta0: the ODE step; gaussian: Flow-SDE, lp_w = 1/(2s²)."""
    return {
        "mid": lambda: coeffs_for(batch),
        "last": lambda: coeffs_for(batch, last=True),
        "eta0": lambda: coeffs_for(batch, eta=0.0),
        "gaussian": lambda: coeffs_for(batch, sampler="flow_sde"),
    }[case]()


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


SHAPES = [(1, 1), (2, 3), (3, 1009), (1, 7, 64), (4, 2, 5, 7), (5, 257)]
CASES = ["mid", "last", "eta0", "gaussian"]


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_triton_step_matches_float64_oracle(impl, dtype, shape, case):
    """The Triton kernel (interpreter): x', μ and the log-prob of the x' it stored, every dtype and shape
    (N = 1, odd N, N below and above one block)."""
    x, v, eps = inputs(shape, dtype, seed=stable_seed(shape, dtype, case))
    c = case_coeffs(case, shape[0])
    out = cps_step(x, v, c, noise=eps, return_mean=True)
    assert_step_close(out, x, v, c, noise=eps)
    if case in ("last", "eta0"):
        assert torch.equal(out.prev_sample, out.mean)  # s = 0: deterministic


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_reference_and_eager_cpu_path_match_float64_oracle(monkeypatch, dtype, case):
    """``cps_step_ref`` (the fp32 oracle of the benchmarks and GPU tests) and the CPU operator with
    FASTCPS_COMPILE=0. Both run ``_step_math`` eagerly, so the second adds only what the operator does
    around it: rows and back, x' and μ in the sample's dtype, the log-prob rescored from the stored x'."""
    monkeypatch.setenv("FASTCPS_IMPL", "torch")
    for shape in SHAPES:
        x, v, eps = inputs(shape, dtype, seed=stable_seed(shape, dtype, case, "eager"))
        c = case_coeffs(case, shape[0])
        ref = cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=eps)
        assert_step_close(ref, x, v, c, noise=eps, where=f" (cps_step_ref {shape})")
        out = cps_step(x, v, c, noise=eps, return_mean=True)
        assert_step_close(out, x, v, c, noise=eps, where=f" (eager operator {shape})")
        scored = cps_step(x, v, c, prev_sample=out.prev_sample)
        assert scored.mean is None
        assert_step_close(scored, x, v, c, prev_sample=out.prev_sample, where=f" (eager scoring {shape})")


@pytest.mark.parametrize("impl", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_scores_a_given_prev_sample(impl, dtype):
    """Scoring mode of the kernel (nothing drawn, nothing written): the given x' comes back as is."""
    x, v, prev = inputs((3, 4, 33), dtype, seed=7)
    c = coeffs_for(3, sampler="dance_sde")
    out = cps_step(x, v, c, prev_sample=prev)
    assert out.mean is None
    assert_step_close(out, x, v, c, prev_sample=prev)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_non_contiguous_inputs(impl):
    """Transposed latents (copied to rows by the wrapper) and row-strided ones (passed as they are)."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(3, 64, 17, generator=g) for _ in range(3)]
    x, v, eps = (t.transpose(1, 2) for t in base)  # (3, 17, 64), not contiguous
    assert not x.is_contiguous()
    c = coeffs_for(3)
    assert_step_close(
        cps_step(x, v, c, noise=eps, return_mean=True), x, v, c, noise=eps, where=" (transposed)"
    )
    x, v, eps = (
        torch.randn(3, 40, generator=g)[:, 5:30] for _ in range(3)
    )  # unit inner stride, row stride 40
    assert_step_close(
        cps_step(x, v, c, noise=eps, return_mean=True), x, v, c, noise=eps, where=" (row-strided)"
    )


TILINGS = [(32, 1, 1), (32, 4, 1), (64, 2, 2), (16, 8, 1), (512, 1, 4)]  # (block, iters, num_warps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block, iters, warps", TILINGS)
def test_step_kernel_agrees_for_every_tiling(dtype, block, iters, warps):
    """The launcher's block/iters/num_warps overrides through the interpreter (tests/test_gpu.py does the
    same on a device): the multi-iteration chunk loop (ITERS > 1), N = 333 whose last chunk is partial
    (with (32, 4): 77 elements, one block fully masked), rows with a stride other than N. x' and μ are
    elementwise, so they must equal the default tiling's bit for bit; the log-prob only reorders sums."""
    from fastcps.kernels.cps_step import cps_step_fwd

    b, n = 3, 333
    g = torch.Generator().manual_seed(block * iters)
    x, v, eps = (
        torch.randn(b, n + 40, generator=g).to(dtype)[:, 5 : 5 + n] for _ in range(3)
    )  # row stride n + 40
    assert x.stride(0) == n + 40
    c = coeffs_for(b, sampler="flow_sde")
    coeffs = (c.alpha, c.beta, c.s, c.lp_w, c.lp_c)
    tile = dict(block=block, iters=iters, num_warps=warps)
    prev, logp, mean = cps_step_fwd(x, v, *coeffs, noise=eps, return_mean=True, **tile)
    assert_step_close(StepResult(prev, logp, mean), x, v, c, noise=eps)
    default = cps_step_fwd(x, v, *coeffs, noise=eps, return_mean=True)
    assert torch.equal(prev, default.prev) and torch.equal(mean, default.mean)
    scored = cps_step_fwd(x, v, *coeffs, prev_sample=eps, **tile)
    assert scored.prev is None and scored.mean is None
    assert_step_close(StepResult(eps, scored.logp, None), x, v, c, prev_sample=eps, where=" (scoring)")


def test_in_kernel_rng_statistics_over_a_million_draws():
    """10^6 draws of the kernel's Philox normal: mean ~ 0, std ~ 1, rows uncorrelated. The launcher
    is called with a large block: the interpreter's cost is per block op, and the noise does not
    depend on the launch shape (checked below)."""
    from fastcps.kernels.cps_step import cps_step_fwd

    b, n = 4, 250_000
    x = torch.zeros(b, n)
    one, zero = torch.ones(b), torch.zeros(b)
    prev = cps_step_fwd(x, x, one, one, one, one, zero, seed=1234, block=131072, iters=2)[0]  # ε itself
    assert abs(float(prev.mean())) < 5 / math.sqrt(b * n)
    assert abs(float(prev.std()) - 1.0) < 5e-3
    assert abs(float(((prev - prev.mean()) ** 3).mean())) < 0.02  # symmetric
    off = torch.corrcoef(prev) - torch.eye(b)
    assert float(off.abs().max()) < 5 / math.sqrt(n), off
    small = cps_step_fwd(x[:, :5000], x[:, :5000], one, one, one, one, zero, seed=1234)[0]
    assert not torch.equal(small[0], small[1])


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_in_kernel_rng_reproducible_and_independent_of_launch_shape(impl):
    b, n = 4, 20_000
    x = torch.zeros(b, n)
    c = step_coeffs("cps", torch.full((b,), 0.9), torch.full((b,), 0.5), 1.0)  # s = σ' = 0.5, μ = 0
    out = cps_step(x, x, c, seed=1234, return_mean=True)
    eps = (out.prev_sample - out.mean) / 0.5
    assert abs(float(eps.mean())) < 5 / math.sqrt(b * n) and abs(float(eps.std()) - 1) < 0.02
    off = torch.corrcoef(eps) - torch.eye(b)
    assert float(off.abs().max()) < 5 / math.sqrt(n), off  # rows independent
    again = cps_step(x, x, c, seed=1234)
    assert torch.equal(again.prev_sample, out.prev_sample)
    other = cps_step(x, x, c, seed=1235)
    assert not torch.equal(other.prev_sample, out.prev_sample)
    # Launch shape does not matter: row 2 alone, with the counter offset it has in the batch.
    row = cps_step(x[2:3], x[2:3], step_coeffs("cps", 0.9, 0.5, 1.0), seed=1234, offset=2 * n)
    assert torch.equal(row.prev_sample[0], out.prev_sample[2])
    assert_step_close(
        out._replace(mean=None), x, x, c, prev_sample=out.prev_sample
    )  # log-prob of the drawn x'


def test_rng_does_not_depend_on_block_size():
    from fastcps.kernels.cps_step import cps_step_fwd

    x = torch.zeros(3, 3001)
    one, zero = torch.ones(3), torch.zeros(3)
    a = cps_step_fwd(x, x, one, one, one, one, zero, seed=7, offset=99)[0]
    for block, iters in [(32, 1), (128, 4), (4096, 1)]:
        b = cps_step_fwd(x, x, one, one, one, one, zero, seed=7, offset=99, block=block, iters=iters)[0]
        assert torch.equal(a, b), (block, iters)


def test_seeded_noise_is_the_same_on_both_paths(monkeypatch):
    x = torch.zeros(2, 3000)
    c = step_coeffs("cps", torch.full((2,), 0.9), torch.full((2,), 0.5), 1.0)
    monkeypatch.setenv("FASTCPS_IMPL", "triton")
    tri = cps_step(x, x, c, seed=99, offset=12345).prev_sample
    monkeypatch.setenv("FASTCPS_IMPL", "torch")
    cpu = cps_step(x, x, c, seed=99, offset=12345).prev_sample
    torch.testing.assert_close(cpu, tri, atol=2e-6, rtol=1e-5)


def test_offsets_beyond_int32():
    """Counters past 2³¹ (and 2³²) still give distinct, well-formed noise: int64 index math."""
    x = torch.zeros(1, 2048)
    c = step_coeffs("cps", 0.9, 0.5, 1.0)
    lo = cps_step(x, x, c, seed=5, offset=0).prev_sample
    hi = cps_step(x, x, c, seed=5, offset=2**32 + 17).prev_sample
    mid = cps_step(x, x, c, seed=5, offset=2**31 - 1000).prev_sample
    for t in (hi, mid):
        assert torch.isfinite(t).all() and not torch.equal(t, lo)
        assert abs(float(t.std()) / 0.5 - 1) < 0.1


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_bad_inputs_name_the_argument(impl):
    """Each refusal of the public wrapper, with its whole message: the argument, what it got, the fix."""
    x = torch.randn(2, 8)
    c = coeffs_for(2)
    meta = torch.empty(2, 8, device="meta")
    cases = [
        (
            dict(model_output=torch.randn(2, 9), noise=x),
            ValueError,
            "argument 'model_output' has shape (2, 9) but 'sample' has shape (2, 8); they must match",
        ),
        (
            dict(model_output=torch.ones(2, 8, dtype=torch.int64), noise=x),
            TypeError,
            "argument 'model_output' has dtype torch.int64; expected float32, bfloat16 or float16",
        ),
        (
            dict(model_output=[0.0] * 8, noise=x),
            TypeError,
            "argument 'model_output' must be a torch.Tensor, got list",
        ),
        (
            dict(noise=torch.randn(2, 9)),
            ValueError,
            "argument 'noise' has shape (2, 9) but 'sample' has shape (2, 8); they must match",
        ),
        (
            dict(noise=meta),
            ValueError,
            "argument 'noise' is on meta but 'sample' is on cpu; move them to the same device",
        ),
        (
            dict(prev_sample=torch.randn(2, 7)),
            ValueError,
            "argument 'prev_sample' has shape (2, 7) but 'sample' has shape (2, 8); they must match",
        ),
        (
            dict(prev_sample=meta),
            ValueError,
            "argument 'prev_sample' is on meta but 'sample' is on cpu; move them to the same device",
        ),
        (
            dict(noise=x, seed=1),
            ValueError,
            "cps_step needs exactly one of noise, seed or prev_sample (got 2); use prev_sample to score a "
            "given x'",
        ),
        (
            dict(),
            ValueError,
            "cps_step needs exactly one of noise, seed or prev_sample (got 0); use prev_sample to score a "
            "given x'",
        ),
        (dict(seed=1.0), TypeError, "argument 'seed' must be a Python int, got float"),
        (
            dict(seed=2**63),
            ValueError,
            "argument 'seed' must fit in int64 (the kernel's seed type), got 9223372036854775808",
        ),
        (
            dict(seed=-(2**63) - 1),
            ValueError,
            "argument 'seed' must fit in int64 (the kernel's seed type), got -9223372036854775809",
        ),
        (
            dict(coeffs=coeffs_for(3), noise=x),
            ValueError,
            "coefficient 'alpha' must have shape (2,) (one per sample), got (3,)",
        ),
        (
            dict(coeffs=c._replace(beta=0.5), noise=x),
            TypeError,
            "coefficient 'beta' must be a (B,) tensor, got float",
        ),
        (
            dict(coeffs=c._replace(lp_c=c.lp_c.to("meta")), noise=x),
            ValueError,
            "coefficient 'lp_c' is on meta but the latents are on cpu",
        ),
        (
            dict(sample=torch.randn(8), model_output=torch.randn(8), noise=torch.randn(8)),
            ValueError,
            "argument 'sample' must have shape (B, ...) with at least one non-batch dim, got shape (8,)",
        ),
    ]
    for kwargs, error, message in cases:
        args = {"sample": x, "model_output": x, "coeffs": c, **kwargs}
        with pytest.raises(error, match="^" + re.escape(message) + "$"):
            cps_step(args.pop("sample"), args.pop("model_output"), args.pop("coeffs"), **args)
    with pytest.raises(ValueError, match="^cps_step_ref needs exactly one of noise or prev_sample$"):
        cps_step_ref(x, x, c.alpha, c.beta, c.s, c.lp_w, c.lp_c)


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_what_the_wrapper_accepts_and_converts(impl):
    """The int64 edges of a seed, one coefficient for the whole batch (shape (1,)), fp64 coefficients
    (made fp32), a latent of N = 2 with stride 2 (copied to unit stride); a given x' comes back as is."""
    g = torch.Generator().manual_seed(11)
    x, v, eps = (torch.randn(2, 8, generator=g) for _ in range(3))
    c = coeffs_for(2)
    for seed in (-(2**63), 2**63 - 1):
        assert torch.isfinite(cps_step(x, v, c, seed=seed).prev_sample).all()
    shared = c._replace(**{n: getattr(c, n)[:1] for n in ("alpha", "beta", "s", "lp_w", "lp_c")})
    per_sample = c._replace(
        **{n: getattr(c, n)[:1].expand(2) for n in ("alpha", "beta", "s", "lp_w", "lp_c")}
    )
    assert_step_close(
        cps_step(x, v, shared, noise=eps), x, v, per_sample, noise=eps, where=" (one shared coefficient)"
    )
    wide = c._replace(**{n: getattr(c, n).double() for n in ("alpha", "beta", "s", "lp_w", "lp_c")})
    assert_step_close(cps_step(x, v, wide, noise=eps), x, v, c, noise=eps, where=" (fp64 coefficients)")
    xs, vs, es = (torch.randn(2, 4, generator=g)[:, ::2] for _ in range(3))  # (2, 2), stride (4, 2)
    assert_step_close(
        cps_step(xs, vs, c, noise=es, return_mean=True), xs, vs, c, noise=es, where=" (N = 2, stride 2)"
    )
    assert cps_step(x, v, c, prev_sample=eps).prev_sample is eps
    assert cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, prev_sample=eps).prev_sample is eps
