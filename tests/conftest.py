"""Test-wide setup. Triton's interpreter must be switched on before any kernel is imported, so the
CPU suite exercises the real Triton kernels on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The compiled CPU path costs ~20 s of inductor start-up per new graph; the broad suites run its
# eager twin (same Python function) and tests/test_cpu_compiled.py runs the compiled one.
os.environ.setdefault("FASTCPS_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "traces: runs fastcps code under torch.compile/dynamo (bench/mutation.sh deselects these: "
                   "dynamo cannot trace the mutation tool's trampolines)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (the CPU suite covers the "
                                   "kernels through TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def impl(request, monkeypatch):
    """Run a test under FASTCPS_IMPL=<param>."""
    monkeypatch.setenv("FASTCPS_IMPL", request.param)
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine two OpenMP threads wait on each other
    when another process holds a core (a 64x384 linear took 25 ms with 2 threads vs 1.7 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
