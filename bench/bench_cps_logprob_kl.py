"""Benchmark of the training op ``cps_logprob_kl`` (log-prob of a stored x' and KL to the reference
policy), forward and forward+backward.

    python bench/bench_cps_logprob_kl.py                # CUDA if present, else the CPU path
    python bench/bench_cps_logprob_kl.py --sizes 1,4,16 --dtypes fp32,bf16 --directions fwd+bwd
    python bench/bench_cps_logprob_kl.py --ptx-only     # sm_90 compile report, no GPU needed

impls: ``fused`` (cps_logprob_kl: Triton fwd/bwd kernels on CUDA, the compiled reference math on CPU),
``naive`` (flow_grpo's training math op by op in fp32: the cps mean from v with autograd, the same mean
from v_ref without, log-prob −mean((x' − μθ)²), KL mean((μθ − μref)²), ``.backward()``),
``compiled_ref`` (torch.compile of cps_logprob_kl_ref, AOTAutograd for the backward).
Bytes the op must move: forward reads x, v, x', v_ref; backward reads the same again and writes ∂v
(latent dtype), plus the (B,) fp32 coefficients and per-sample outputs / incoming gradients.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from fastcps import cps_logprob_kl, cps_logprob_kl_ref, step_coeffs

OP = "cps_logprob_kl"
SIGMA, SIGMA_NEXT, ETA = 0.7, 0.6, 0.8


def _cps_mean(sample, model_output, sigma, sigma_prev, noise_level):
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = sample - sigma * model_output
    noise_estimate = sample + model_output * (1 - sigma)
    return pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(sigma_prev**2 - std_dev_t**2)


def naive_logprob_kl(sample, model_output, prev_sample, ref_model_output, sigma, sigma_prev, noise_level):
    """flow_grpo's training step math for the cps sampler, op by op in fp32 (sigma: (B, 1, 1)). The
    anchors re-run the whole step for the reference output; only its mean is recomputed here."""
    sample, prev_sample = sample.float(), prev_sample.float()
    mean = _cps_mean(sample, model_output.float(), sigma, sigma_prev, noise_level)
    dims = tuple(range(1, mean.ndim))
    log_prob = (-((prev_sample.detach() - mean) ** 2)).mean(dim=dims)
    with torch.no_grad():
        mean_ref = _cps_mean(sample, ref_model_output.float(), sigma, sigma_prev, noise_level)
    kl = ((mean - mean_ref) ** 2).mean(dim=dims)
    return log_prob, kl


def logprob_kl_bytes(shape, dtype, direction: str) -> int:
    n = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    b = shape[0]
    fwd = 4 * n * esize + b * 4 * (5 + 2)  # x, v, x', v_ref; alpha, beta, lp_w, lp_c, kl_w; logp, kl
    bwd = 5 * n * esize + b * 4 * (4 + 2)  # x, v, x', v_ref, ∂v; alpha, beta, lp_w, kl_w; g_logp, g_kl
    return fwd + (bwd if direction == "fwd+bwd" else 0)


def bench_one(device, shape, dtype, direction, impls, args):
    g = torch.Generator(device=device).manual_seed(0)
    x, v, prev, vref = (
        torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(4)
    )
    b = shape[0]
    c = step_coeffs("cps", torch.full((b,), SIGMA), torch.full((b,), SIGMA_NEXT), ETA, device=device)
    sig = torch.full((b, 1, 1), SIGMA, device=device)
    sig_next = torch.full((b, 1, 1), SIGMA_NEXT, device=device)
    compiled_ref = torch.compile(cps_logprob_kl_ref) if "compiled_ref" in impls else None
    train = direction == "fwd+bwd"
    if train:
        v.requires_grad_(True)

    calls = {
        "fused": lambda: cps_logprob_kl(x, v, prev, c, vref),
        "naive": lambda: naive_logprob_kl(x, v, prev, vref, sig, sig_next, ETA),
        "compiled_ref": lambda: compiled_ref(x, v, prev, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=vref),
    }

    def wrap(call):
        if not train:

            def fwd():
                with torch.no_grad():
                    return call()

            return fwd

        def fwd_bwd():
            v.grad = None  # no accumulation pass: each call writes ∂v once
            logp, kl = call()
            (logp.sum() + kl.sum()).backward()
            return logp, kl

        return fwd_bwd

    fns = {k: wrap(f) for k, f in calls.items() if k in impls}

    # Same thing benchmarked: log-prob, KL (and ∂v) of every impl against the naive sequence.
    want = fns["naive"]() if "naive" in fns else wrap(calls["naive"])()
    want_grad = v.grad.clone() if train else None
    for name, fn in fns.items():
        got = fn()
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5, msg=f"{name} log_prob")
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6, msg=f"{name} kl")
        if train:
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(
                v.grad.float(), want_grad.float(), rtol=tol, atol=tol * 1e-5, msg=f"{name} dv"
            )

    nb = logprob_kl_bytes(shape, dtype, direction)
    timed = dict(fns)
    for name in fns:
        timed[f"copy:{name}"] = common.copy_fn(nb, device)
    timings = common.time_all(timed, device, args.repeats, args.warmup, args.timer)
    peaks = {name: common.peak_mem_gib(fn, device) for name, fn in fns.items()}
    base = {
        **common.meta(device, args.timer),
        "op": OP,
        "direction": direction,
        "dtype": common.DTYPE_NAMES[dtype],
        "shape": "x".join(map(str, shape)),
    }
    notes = {
        "fused": common.fused_note(device),
        "naive": "flow_grpo cps training math, eager fp32 autograd",
        "compiled_ref": "torch.compile(cps_logprob_kl_ref)",
    }
    return common.result_rows(base, timings, {k: nb for k in fns}, peaks, notes)


def main(argv=None) -> list[dict]:
    p = common.parser(OP)
    p.add_argument("--directions", default="fwd,fwd+bwd", help="comma-separated: fwd,fwd+bwd")
    args = p.parse_args(argv)
    device, shapes, dtypes, impls = common.setup(args)
    directions = args.directions.split(",")
    if set(directions) - {"fwd", "fwd+bwd"}:
        raise SystemExit(f"--directions: choose from fwd,fwd+bwd, got {args.directions}")

    def cells(shape, dtype):
        return [
            row for direction in directions for row in bench_one(device, shape, dtype, direction, impls, args)
        ]

    return common.run_and_report(OP, args, device, shapes, dtypes, cells, ("logprob_kl",))


if __name__ == "__main__":
    main()
