"""Which implementation runs an op (fastcps.ops.dispatch): FASTCPS_IMPL, and when the CPU math is compiled.
torch.compile is replaced by a recorder here, so these run in milliseconds and without dynamo;
tests/test_cpu_compiled.py runs the real compile."""

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastcps.ops import dispatch
from fastcps.ops.dispatch import choose_impl, maybe_compile


def test_fastcps_impl_is_read_case_and_space_insensitively(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("FASTCPS_IMPL", raising=False)
    assert choose_impl(x) == "torch"
    for value, want in [("", "torch"), (" AUTO ", "torch"), ("Torch", "torch"), ("triton\n", "triton")]:
        monkeypatch.setenv("FASTCPS_IMPL", value)
        assert choose_impl(x) == want, value
    monkeypatch.setenv("FASTCPS_IMPL", "cuda")
    with pytest.raises(
        ValueError, match=r"^FASTCPS_IMPL must be one of \('auto', 'triton', 'torch'\), got 'cuda'$"
    ):
        choose_impl(x)


def test_auto_picks_triton_for_cuda_tensors_only_when_triton_is_there(monkeypatch):
    monkeypatch.setenv("FASTCPS_IMPL", "auto")
    with FakeTensorMode():
        cuda = torch.empty(2, device="cuda")
    assert choose_impl(cuda) == "triton" and choose_impl(torch.zeros(2)) == "torch"
    monkeypatch.setattr(dispatch, "_triton_available", lambda: False)
    assert choose_impl(cuda) == "torch"
    monkeypatch.setenv("FASTCPS_IMPL", "triton")
    with pytest.raises(
        RuntimeError, match=r"^FASTCPS_IMPL=triton but triton is not installed \(pip install triton\)$"
    ):
        choose_impl(cuda)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTCPS_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        RuntimeError,
        match=r"^FASTCPS_IMPL=triton on CPU tensors needs Triton's interpreter: set "
        r"TRITON_INTERPRET=1 before fastcps.kernels is imported \(tests only; "
        r"it is slow\), or use FASTCPS_IMPL=auto$",
    ):
        choose_impl(torch.zeros(1))
    with FakeTensorMode():
        assert choose_impl(torch.empty(1, device="cuda")) == "triton"  # a GPU needs no interpreter


@pytest.fixture
def recorded_compiles(monkeypatch):
    """torch.compile replaced by a recorder whose 'compiled' function is the eager one; a fresh record of
    failed compiles."""
    calls = []

    def compile_(fn, **kwargs):
        calls.append(("compile", fn.__name__, kwargs))

        def compiled(*args, **kw):
            calls.append("compiled")
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(dispatch, "_COMPILE_FAILED", set())
    for name in ("FASTCPS_COMPILE", "FASTCPS_COMPILE_MIN_NUMEL"):
        monkeypatch.delenv(name, raising=False)
    return calls


def double(t):
    return 2 * t


def test_maybe_compile_compiles_large_tensors_once(monkeypatch, recorded_compiles):
    """Eager below FASTCPS_COMPILE_MIN_NUMEL elements (default 2^18), compiled (one torch.compile,
    fullgraph, dynamic left to inductor) at or above it; FASTCPS_COMPILE=0 or being traced: eager."""
    f = maybe_compile(double)
    assert f.__name__ == "double"
    assert torch.equal(f(torch.ones(2**18 - 1)), torch.full((2**18 - 1,), 2.0)) and recorded_compiles == []
    f(torch.ones(2**18))
    f(torch.ones(2**18 + 1))
    assert recorded_compiles == [
        ("compile", "double", {"dynamic": None, "fullgraph": True}),
        "compiled",
        "compiled",
    ]
    monkeypatch.setenv("FASTCPS_COMPILE_MIN_NUMEL", "4")
    assert torch.equal(f(torch.ones(4)), torch.full((4,), 2.0)) and recorded_compiles[-1] == "compiled"
    recorded_compiles.clear()
    f(torch.ones(3))
    monkeypatch.setenv("FASTCPS_COMPILE", "0")
    f(torch.ones(8))
    monkeypatch.setenv("FASTCPS_COMPILE", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    f(torch.ones(8))
    assert recorded_compiles == []


def test_a_failed_compile_warns_once_and_stays_eager(monkeypatch, recorded_compiles):
    def broken(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv("FASTCPS_COMPILE_MIN_NUMEL", "0")
    f, g = maybe_compile(double), maybe_compile(lambda t: t + 1)
    with pytest.warns(
        RuntimeWarning,
        match=r"^torch.compile of double failed \(RuntimeError: no C\+\+ compiler\); "
        r"using eager PyTorch for it from now on$",
    ):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert dispatch._COMPILE_FAILED == {"double"}
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(g(torch.ones(2)), torch.full((2,), 2.0))
    assert compiled == ["<lambda>"]  # f is not compiled again; other functions still are


def test_torch_is_obeyed_on_cuda_tensors_and_a_missing_triton_is_seen(monkeypatch):
    """FASTCPS_IMPL=torch keeps a GPU tensor on the PyTorch path; with triton not importable, auto
    falls back to it (and _triton_available says so rather than raising)."""
    import sys

    with FakeTensorMode():
        cuda = torch.empty(2, device="cuda")
    monkeypatch.setenv("FASTCPS_IMPL", "torch")
    assert choose_impl(cuda) == "torch"
    monkeypatch.setenv("FASTCPS_IMPL", "auto")
    assert dispatch._triton_available() is True
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    assert dispatch._triton_available() is False
    assert choose_impl(cuda) == "torch"
