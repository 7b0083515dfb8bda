"""Test-wide setup. Triton's interpreter must be switched on before any kernel is imported, so the
CPU suite exercises the real Triton kernels on CPU tensors."""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The compiled CPU path costs ~20 s of inductor start-up per new graph; the broad suites run its
# eager twin (same Python function) and tests/test_cpu_compiled.py runs the compiled one.
os.environ.setdefault("FASTCPS_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@contextlib.contextmanager
def isolated_global_state():
    """Undo, on exit, what the body changed in the process: environment variables (an in-process
    ``fastcps.train.main`` sets MASTER_PORT, RANK, ...; the benchmarks pin FASTCPS_IMPL), the reward
    registry (test rewards), and a process group started inside (DeepSpeed's, gloo)."""
    from fastcps.rewards import REGISTRY

    env, registry = dict(os.environ), dict(REGISTRY)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_group()
        REGISTRY.clear()
        REGISTRY.update(registry)
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)


def destroy_process_group() -> None:
    """Through DeepSpeed's communication layer when it started the group (it keeps references of its
    own; its next ``init_distributed`` then starts a fresh group), else through torch."""
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and comm.cdb is not None and comm.cdb.is_initialized():
        comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    """No test sees what an earlier one left in the process (see ``isolated_global_state``)."""
    with isolated_global_state():
        yield


#: The files that take minutes, longest first: seconds of test time per file measured by
#: `pytest -n 2 -v --durations=0` on the 2-core machine, nothing else running (2026-12-05, at a229bd8;
#: test_plan_goals.py's without the Qwen-Image-Edit plan it then held). With `--dist loadfile` and
#: `--no-loadscope-reorder` (pyproject.toml's addopts) the two workers take files in this order, then the
#: rest in collection order, so both end together (xdist's default order, by test count, left the
#: full-size plans for last on one worker: 1123 s instead of 892 s).
SLOWEST_FILES = (
    "test_plan_goals.py",  # 349: the recipes at full size on fake tensors
    "test_plan.py",  # 124
    "test_qwenimage_edit.py",  # 103
    "test_zero3.py",  # 100
    "test_qwenimage.py",  # 96
    "test_failing_together.py",  # 84
    "test_trainer.py",  # 83
    "test_golden_curve.py",  # 82
    "test_wiring_runs.py",  # 75
    "test_launchers.py",  # 72
    "test_virtual_cuda.py",  # 71
    "test_reward_service.py",  # 64
    "test_checkpoints.py",  # 61
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU; this machine has none (the CPU suite covers the "
        "kernels through TRITON_INTERPRET=1)"
    )
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


@pytest.fixture
def float64_default():
    """torch.set_default_dtype(torch.float64) for one test (a notebook's habit), restored after it."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)
