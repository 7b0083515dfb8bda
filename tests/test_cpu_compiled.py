"""The CPU path users run: the operators' math under torch.compile (inductor's C++ backend), which the
operators use for latents of FASTCPS_COMPILE_MIN_NUMEL elements or more. The rest of the suite sets
FASTCPS_COMPILE=0 and runs the eager twin (the functions ``cps_step_ref`` shares); here the compiled
kernels are checked against the float64 oracle (tests/oracle.py).

Inductor costs ~15 s to start and ~1-2 s per new graph on 2 cores, so one module-scoped run makes every
call (the variants the operators compile: per dtype a static graph for the first shape, the dynamic-shape
graph inductor switches to for the next ones, a B = 1 specialisation) and the tests only compare. Dynamo is
reset before each dtype, as a process that uses one dtype sees it: its recompile limit (8 graphs per
function) would otherwise send later variants to the eager fallback, which the last test refuses."""

import warnings

import pytest
import torch

from fastcps import cps_logprob_kl, cps_step
from fastcps.ops import dispatch
from fastcps.ops.philox import philox_randn
from oracle import assert_logprob_kl_close, assert_step_close
from test_cps_logprob_kl import make_case
from test_cps_step import case_coeffs, inputs

pytestmark = pytest.mark.traces

BF16 = torch.bfloat16
# (dtype, shape, case) of each call, in call order within a dtype.
STEPS = [
    (torch.float32, (3, 1009), "mid"),
    (torch.float32, (4, 2, 5, 7), "last"),
    (torch.float32, (5, 257), "gaussian"),
    (torch.float32, (1, 7, 64), "mid"),
    (BF16, (3, 1009), "gaussian"),
    (BF16, (5, 257), "mid"),
    (BF16, (1, 7, 64), "last"),
]
SCORES = [(torch.float32, (3, 1009), "gaussian"), (torch.float32, (5, 257), "mid"), (BF16, (2, 33), "mid")]
SEEDED = [(torch.float32, (3, 1009), "mid"), (BF16, (5, 257), "gaussian")]
# "mixed": fp32 latents with a bf16 model output, the training layout.
TRAINS = [
    (torch.float32, (3, 1009), "mid"),
    (torch.float32, (5, 257), "gaussian"),
    (torch.float32, (1, 7, 64), "last"),
    (torch.float32, (4, 2, 5, 7), "no_ref"),
    (BF16, (3, 1009), "gaussian"),
    (BF16, (5, 257), "no_ref"),
    (BF16, (2, 3, 37), "mixed"),
]
SEED, OFFSET = 4242, 77


def key(spec):
    dtype, shape, case = spec
    return f"{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}-{case}"


def _run_step(spec):
    dtype, shape, case = spec
    x, v, eps = inputs(shape, dtype, seed=sum(shape))
    c = case_coeffs(case, shape[0])
    return (x, v, c, eps), cps_step(x, v, c, noise=eps, return_mean=True)


def _run_score(spec):
    dtype, shape, case = spec
    x, v, prev = inputs(shape, dtype, seed=sum(shape) + 1)
    c = case_coeffs(case, shape[0])
    return (x, v, c, prev), cps_step(x, v, c, prev_sample=prev)


def _run_seeded(spec):
    dtype, shape, case = spec
    x, v, _ = inputs(shape, dtype, seed=sum(shape) + 2)
    c = case_coeffs(case, shape[0])
    eps = philox_randn(SEED, OFFSET + torch.arange(x.numel())).reshape(shape)
    return (x, v, c, eps), cps_step(x, v, c, seed=SEED, offset=OFFSET, return_mean=True)


def _run_train(spec):
    dtype, shape, case = spec
    x, v, prev, vref, c, g_lp, g_kl = make_case(
        shape,
        torch.float32 if case == "mixed" else dtype,
        "mid" if case == "mixed" else case,
        seed=sum(shape) + 3,
    )
    if case == "mixed":
        v = v.to(dtype)
    vg = v.clone().requires_grad_(True)
    lp, kl = cps_logprob_kl(x, vg, prev, c, vref)
    (lp * g_lp + kl * g_kl).sum().backward()
    return (x, v, prev, vref, c, g_lp, g_kl), (lp.detach(), kl.detach(), vg.grad)


RUNNERS = {
    "step": (STEPS, _run_step),
    "score": (SCORES, _run_score),
    "seeded": (SEEDED, _run_seeded),
    "train": (TRAINS, _run_train),
}


@pytest.fixture(scope="module")
def compiled():
    """{(kind, key): (inputs, outputs)} of every call, made with the compiled CPU path, plus the
    warnings raised and the number of graphs dynamo compiled."""
    runs, graphs = {}, 0
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("FASTCPS_IMPL", "torch")
        mp.setenv("FASTCPS_COMPILE", "1")
        mp.setenv("FASTCPS_COMPILE_MIN_NUMEL", "0")
        mp.setattr(dispatch, "_COMPILE_FAILED", set())
        for dtype in (torch.float32, BF16):
            torch._dynamo.reset()
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for kind, (specs, run) in RUNNERS.items():
                for spec in specs:
                    if spec[0] == dtype:
                        runs[kind, key(spec)] = run(spec)
            graphs += torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        failed = set(dispatch._COMPILE_FAILED)
    torch._dynamo.reset()
    return runs, [str(w.message) for w in caught], failed, graphs


def ids(specs):
    return [key(s) for s in specs]


@pytest.mark.parametrize("spec", STEPS, ids=ids(STEPS))
def test_compiled_step_matches_float64_oracle(compiled, spec):
    """Drawing x' from a given ε, with μ: x', μ and the log-prob of the stored x' (which, in half
    dtypes, the operator rescores because inductor may fuse away the rounding)."""
    (x, v, c, eps), out = compiled[0]["step", key(spec)]
    assert_step_close(out, x, v, c, noise=eps)


@pytest.mark.parametrize("spec", SCORES, ids=ids(SCORES))
def test_compiled_scoring_matches_float64_oracle(compiled, spec):
    """Scoring a given x' without μ (the rollout's replay and the rescoring graph of half dtypes)."""
    (x, v, c, prev), out = compiled[0]["score", key(spec)]
    assert out.mean is None
    assert_step_close(out, x, v, c, prev_sample=prev)


@pytest.mark.parametrize("spec", SEEDED, ids=ids(SEEDED))
def test_compiled_seeded_step_draws_the_philox_noise(compiled, spec):
    """seed=: ε is Triton's tl.randn(seed, offset + b·N + n), drawn by fastcps.ops.philox on CPU."""
    (x, v, c, eps), out = compiled[0]["seeded", key(spec)]
    assert_step_close(out, x, v, c, noise=eps)


@pytest.mark.parametrize("spec", TRAINS, ids=ids(TRAINS))
def test_compiled_logprob_kl_forward_backward_match_float64_oracle(compiled, spec):
    """The training op's compiled forward and its backward operator's compiled ∂v, through autograd."""
    args, got = compiled[0]["train", key(spec)]
    assert_logprob_kl_close(got, *args)


def test_every_call_ran_compiled(compiled):
    """No compile failed (each would have fallen back to eager math, loudly, and made the comparisons
    above eager ones) and dynamo did compile graphs for both dtypes."""
    _, caught, failed, graphs = compiled
    assert not failed, f"torch.compile failed for {sorted(failed)}: {[w for w in caught if 'compile' in w]}"
    assert not [w for w in caught if "torch.compile of" in w]
    assert graphs >= 2 * 3, graphs  # at least a step, a forward and a backward graph per dtype
