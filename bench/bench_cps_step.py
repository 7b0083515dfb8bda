"""Benchmark of the rollout step ``cps_step`` (x' = α·x + β·v + s·ε and its log-prob, one pass).

    python bench/bench_cps_step.py                      # CUDA if present, else the CPU path
    python bench/bench_cps_step.py --sizes 1,4,16 --dtypes fp32,bf16 --mean
    python bench/bench_cps_step.py --ptx-only           # sm_90 compile report, no GPU needed

impls: ``fused`` (cps_step: Triton on CUDA, the compiled reference on CPU), ``naive`` (flow_grpo's cps
branch op by op in fp32), ``compiled_ref`` (torch.compile of cps_step_ref). Bytes the op must move:
read x, v, ε, write x' (+ μ with --mean), all in the latent dtype, plus the five (B,) fp32
coefficients read and the (B,) fp32 log-prob written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from fastcps import cps_step, cps_step_ref, step_coeffs

OP = "cps_step"
SIGMA, SIGMA_NEXT, ETA = 0.7, 0.6, 0.8


def naive_step(sample, model_output, noise, sigma, sigma_prev, noise_level, return_mean=False):
    """flow_grpo's ``sde_step_with_logprob`` cps branch, op by op in fp32 (sigma: (B, 1, 1))."""
    dtype = sample.dtype
    sample, model_output, noise = sample.float(), model_output.float(), noise.float()
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = sample - sigma * model_output
    noise_estimate = sample + model_output * (1 - sigma)
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
        sigma_prev**2 - std_dev_t**2
    )
    prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    mean = prev_sample_mean.to(dtype) if return_mean else None
    return prev_sample.to(dtype), log_prob, mean


def step_bytes(shape, dtype, return_mean: bool) -> int:
    n = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    return n * esize * (4 + int(return_mean)) + shape[0] * 4 * (5 + 1)


def bench_one(device, shape, dtype, impls, args):
    g = torch.Generator(device=device).manual_seed(0)
    x, v, eps = (
        torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(3)
    )
    b = shape[0]
    c = step_coeffs("cps", torch.full((b,), SIGMA), torch.full((b,), SIGMA_NEXT), ETA, device=device)
    sig = torch.full((b, 1, 1), SIGMA, device=device)
    sig_next = torch.full((b, 1, 1), SIGMA_NEXT, device=device)
    compiled_ref = torch.compile(cps_step_ref) if "compiled_ref" in impls else None

    fns = {
        "fused": lambda: cps_step(x, v, c, noise=eps, return_mean=args.mean),
        "naive": lambda: naive_step(x, v, eps, sig, sig_next, ETA, return_mean=args.mean),
        "compiled_ref": lambda: compiled_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=eps),
    }
    fns = {k: f for k, f in fns.items() if k in impls}

    # Same thing benchmarked: every impl's x' and log-prob against the naive sequence.
    want = naive_step(x, v, eps, sig, sig_next, ETA)
    for name, fn in fns.items():
        got = fn()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol, msg=f"{name} x'")
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5, msg=f"{name} log_prob")

    nb = step_bytes(shape, dtype, args.mean)
    timed = dict(fns)
    for name in fns:
        timed[f"copy:{name}"] = common.copy_fn(nb, device)
    timings = common.time_all(timed, device, args.repeats, args.warmup, args.timer)
    peaks = {name: common.peak_mem_gib(fn, device) for name, fn in fns.items()}
    base = {
        **common.meta(device, args.timer),
        "op": OP,
        "direction": "fwd",
        "dtype": common.DTYPE_NAMES[dtype],
        "shape": "x".join(map(str, shape)),
    }
    notes = {
        "fused": common.fused_note(device) + ("; +mean" if args.mean else ""),
        "naive": "flow_grpo cps branch, eager fp32",
        "compiled_ref": "torch.compile(cps_step_ref)",
    }
    return common.result_rows(base, timings, {k: nb for k in fns}, peaks, notes)


def main(argv=None) -> list[dict]:
    p = common.parser(OP)
    p.add_argument("--mean", action="store_true", help="fused also writes μ (return_mean=True)")
    args = p.parse_args(argv)
    device, shapes, dtypes, impls = common.setup(args)
    return common.run_and_report(
        OP,
        args,
        device,
        shapes,
        dtypes,
        lambda shape, dtype: bench_one(device, shape, dtype, impls, args),
        ("cps_step",),
    )


if __name__ == "__main__":
    main()
