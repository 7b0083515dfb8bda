"""The project's tolerance rule (flash-attention's; docs/testing.md states it): compare the fused op and a
same-precision PyTorch run against the fp32 reference; the fused error may be at most twice PyTorch's
own, plus a small atol, plus one ulp of the output dtype (Triton's interpreter rounds bf16 by
truncation). fp32: ≤ 1e-6 relative to the reference's largest magnitude.
Failures print where and by how much."""

from __future__ import annotations

import torch


def _report(name, got, ref, err, bound, extra=""):
    flat_err = (got.double() - ref.double()).abs().flatten()
    worst = torch.topk(flat_err, k=min(5, flat_err.numel())).indices
    idx = [tuple(int(i) for i in torch.unravel_index(w, got.shape)) for w in worst]
    rows = "\n".join(
        f"    at {i}: got {float(got[i]):.9g}  ref {float(ref[i]):.9g}  |diff| {float(flat_err[w]):.3g}"
        for i, w in zip(idx, worst)
    )
    return (
        f"{name}: max |fused - ref| = {err:.4g} exceeds the bound {bound:.4g} {extra}\n"
        f"  shape {tuple(got.shape)}, dtype {got.dtype}; worst elements:\n{rows}"
    )


def assert_close_fp32(name, got, ref, rtol=1e-6, atol=0.0):
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if torch.isnan(ref).any() or torch.isnan(got).any():
        if not torch.equal(torch.isnan(got), torch.isnan(ref)):
            raise AssertionError(f"{name}: NaN pattern differs from the reference")
        keep = ~torch.isnan(ref)
        got, ref = got[keep], ref[keep]
        if ref.numel() == 0:
            return
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    bound = rtol * float(ref.abs().max()) + atol
    if err > bound:
        raise AssertionError(_report(name, got, ref, err, bound, f"(rtol {rtol} x max|ref|, atol {atol})"))


def assert_close_lowp(name, got, ref, torch_same_precision, out_dtype, atol=1e-5, ulp=None):
    """fused error <= 2 x PyTorch's same-precision error + atol + 1 ulp(out_dtype) at max|ref|
    (``ulp`` overrides that allowance, e.g. for a reduction over rounded elements)."""
    got, ref, pt = got.detach().double(), ref.detach().double(), torch_same_precision.detach().double()
    err = float((got - ref).abs().max())
    pt_err = float((pt - ref).abs().max())
    ulp = torch.finfo(out_dtype).eps * float(ref.abs().max()) if ulp is None else float(ulp)
    bound = 2 * pt_err + atol + ulp
    if err > bound:
        raise AssertionError(
            _report(
                name,
                got,
                ref,
                err,
                bound,
                f"(2 x PyTorch {out_dtype} error {pt_err:.3g} + atol {atol} + 1 ulp {ulp:.3g})",
            )
        )


def logp_ulp_allowance(prev32, mean32, lp_w, stored_dtype):
    """How far the log-prob may move when every stored x' element moves by 1 ulp of its dtype:
    lp_w·mean(2|d|·u + u²), u = eps(dtype)·|x'|. The interpreter truncates where a GPU rounds."""
    b = prev32.shape[0]
    u = torch.finfo(stored_dtype).eps * prev32.double().abs().reshape(b, -1)
    d = (prev32.double() - mean32.double()).reshape(b, -1).abs()
    return float((lp_w.double().abs() * (2 * d * u + u * u).mean(1)).max())
