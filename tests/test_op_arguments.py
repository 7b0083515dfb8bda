"""What the operators (``torch.ops.fastcps.*``) refuse, and that each error names the argument: the public
functions give friendlier errors first (tests/test_cps_step.py, test_cps_logprob_kl.py); these checks stop
a direct caller of an operator, or a fake-CUDA trace mixing in a CPU tensor, before a kernel reads a wrong
pointer. Also: the operators differentiate to v only."""

import pytest
import torch

from test_ops_library import OPS, backward_args, logprob_kl_args, step_args

F32 = torch.float32
SHAPE = (3, 7)
LATENTS = {
    "cps_step": ["v", "noise", "prev_sample"],
    "cps_logprob_kl": ["v", "prev", "v_ref"],
    "cps_logprob_kl_backward": ["v", "prev", "v_ref"],
}
COEFFS = {
    "cps_step": ["alpha", "beta", "std", "lp_w", "lp_c"],
    "cps_logprob_kl": ["alpha", "beta", "lp_w", "lp_c", "kl_w"],
    "cps_logprob_kl_backward": ["alpha", "beta", "lp_w", "kl_w", "g_logp", "g_kl"],
}


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    monkeypatch.setenv("FASTCPS_IMPL", "torch")


def valid_args(op, name=None):
    """A valid argument list of ``op`` (the cps_step mode that uses ``name``) and the schema's names."""
    make = {
        "cps_step": lambda: step_args("prev" if name == "prev_sample" else "noise", True, F32, SHAPE),
        "cps_logprob_kl": lambda: logprob_kl_args(True, F32, SHAPE),
        "cps_logprob_kl_backward": lambda: backward_args(True, F32, SHAPE),
    }[op]
    names = [a.name for a in getattr(torch.ops.fastcps, op).default._schema.arguments]
    return list(make()), names


def call(op, args):
    return getattr(torch.ops.fastcps, op)(*args)


@pytest.mark.parametrize("op, name", [(op, n) for op in OPS for n in LATENTS[op]])
def test_operator_names_a_bad_latent(op, name):
    args, names = valid_args(op, name)
    i = names.index(name)
    good = args[i].detach()
    for bad, msg in [
        (good[:, :-1], rf"'{name}' has shape \(3, 6\), 'x' has \(3, 7\); they must match"),
        (good.to("meta"), rf"'{name}' is on meta but 'x' is on cpu; move them to the same device"),
        (torch.randn(7, 3).t(), rf"'{name}' needs unit stride along N \(see fastcps.ops.checks.as_rows\)"),
    ]:
        args[i] = bad
        with pytest.raises(ValueError, match=rf"^fastcps::{op}: {msg}$"):
            call(op, args)


@pytest.mark.parametrize("op, name", [(op, n) for op in OPS for n in COEFFS[op]])
def test_operator_names_a_bad_coefficient(op, name):
    args, names = valid_args(op)
    i = names.index(name)
    good = args[i]
    for bad, desc in [
        (good.double(), r"torch.float64 \(3,\) on cpu"),
        (good[:2], r"torch.float32 \(2,\) on cpu"),
        (torch.ones(6)[::2], r"torch.float32 \(3,\) on cpu"),
        (good.to("meta"), r"torch.float32 \(3,\) on meta"),
    ]:
        args[i] = bad
        with pytest.raises(
            ValueError,
            match=rf"^fastcps::{op}: coefficient '{name}' is {desc}; it must be contiguous "
            r"float32 \(3,\) on cpu, like 'x'$",
        ):
            call(op, args)


@pytest.mark.parametrize("op", OPS)
def test_operator_needs_rows(op):
    args, _ = valid_args(op)
    args[0] = args[0].reshape(3, 7, 1)
    with pytest.raises(
        ValueError, match=rf"^fastcps::{op}: 'x' must be \(B, N\) rows, got shape \(3, 7, 1\)$"
    ):
        call(op, args)


def test_operator_argument_combinations():
    args, names = valid_args("cps_step")
    args[names.index("prev_sample")] = args[names.index("noise")]
    with pytest.raises(
        ValueError, match=r"^fastcps::cps_step needs exactly one of noise, seed or prev_sample \(got 2\)$"
    ):
        call("cps_step", args)
    args, names = valid_args("cps_logprob_kl_backward")
    for missing in ("kl_w", "g_kl"):
        partial = list(args)
        partial[names.index(missing)] = None
        with pytest.raises(
            ValueError, match=r"^fastcps::cps_logprob_kl_backward: with v_ref, give kl_w and g_kl too$"
        ):
            call("cps_logprob_kl_backward", partial)


@pytest.mark.parametrize("op", ["cps_step", "cps_logprob_kl"])
def test_operators_differentiate_to_v_only(op):
    """x (and x', ε, v_ref) are data: a loss through the operator leaves them without a gradient even when
    they require one, whether or not v does."""
    for v_requires_grad in (True, False):
        args, names = valid_args(op, "prev_sample")
        x = args[0].requires_grad_(True)
        args[1] = args[1].detach().requires_grad_(v_requires_grad)
        out = call(op, args)
        sum(o.float().sum() for o in out if o.numel()).backward()
        assert x.grad is None
        assert (args[1].grad is not None) == v_requires_grad


def replaced(op, args, names, kinds, make):
    """``args`` with every present tensor argument of the given kinds ("latents": x and the latents,
    "coeffs": the coefficients) replaced by ``make(t)``."""
    wanted = {"latents": ["x", *LATENTS[op]], "coeffs": COEFFS[op]}
    chosen = {n for k in kinds for n in wanted[k]}
    return [make(a.detach()) if n in chosen and a is not None else a for a, n in zip(args, names)]


@pytest.mark.parametrize("op", OPS)
def test_stride_rule_edges(op):
    """One column (N = 1) needs no unit stride and one sample (B = 1) no contiguous coefficient; a
    column pair (N = 2) with stride 2 and a coefficient pair (B = 2) with stride 2 are refused."""
    args, names = valid_args(op)
    column = replaced(
        op, args, names, ["latents"], lambda t: t[:, :1].t().contiguous().t()
    )  # (3, 1), stride (1, 3)
    assert column[0].shape == (3, 1) and column[0].stride(1) != 1
    call(op, column)
    one = replaced(op, args, names, ["latents", "coeffs"], lambda t: t[:1])
    one = replaced(op, one, names, ["coeffs"], lambda t: t.repeat(2)[::2])  # (1,), stride 2
    call(op, one)
    pair = replaced(op, args, names, ["latents"], lambda t: t[:, :4:2])  # (3, 2), stride (7, 2)
    pair[0] = pair[0].contiguous()  # x with unit stride: the first latent is the one refused
    with pytest.raises(ValueError, match=rf"^fastcps::{op}: '{LATENTS[op][0]}' needs unit stride along N"):
        call(op, pair)
    two = replaced(op, args, names, ["latents", "coeffs"], lambda t: t[:2])
    two = replaced(op, two, names, ["coeffs"], lambda t: t.repeat(2)[::2])  # (2,), stride 2
    with pytest.raises(
        ValueError,
        match=rf"^fastcps::{op}: coefficient '{COEFFS[op][0]}' is torch.float32 \(2,\) "
        r"on cpu; it must be contiguous float32 \(2,\) on cpu, like 'x'$",
    ):
        call(op, two)
