"""No import name of this repository hides an installed distribution's, and every entry point starts
from the repository root, where ``python -m`` puts the root first on ``sys.path``.

Why: transformers 5.25 imports the ``kernels`` distribution; a ``kernels/__init__.py`` at the root made
the project's Triton folder a top-level package that shadowed it, and every ``python -m fastcps.*``
command and ``python -m pytest`` from the root failed (``cannot import name 'CUDAProperties' from
'kernels'``). kernels/README.md says why that folder has no ``__init__.py``.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `python -m X --help` from the root: the README's commands and the other CLIs.
ENTRY_POINTS = (
    "fastcps.train",
    "fastcps.sample",
    "fastcps.plan",
    "fastcps.gpucheck",
    "fastcps.analysis",
    "fastcps.fetch",
)


def root_import_names(root: Path) -> set[str]:
    """Top-level names that ``root`` on ``sys.path`` makes importable as regular packages or modules
    (a folder without ``__init__.py`` is only a namespace portion: any installed package wins over it)."""
    names = set()
    for entry in root.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".")[0])
    return names


def test_the_root_provides_no_top_level_name_but_fastcps():
    assert root_import_names(ROOT) == {"fastcps"}, (
        "a top-level package or module at the repository root shadows any installed distribution of the same "
        "import name whenever the root is on sys.path (python -m, python -m pytest); put it under fastcps/"
    )


def test_root_import_names_sees_a_package_and_a_module(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "namespace_only").mkdir()
    (tmp_path / "setup_helper.py").write_text("")
    assert root_import_names(tmp_path) == {"setup_helper"}
    (tmp_path / "kernels" / "__init__.py").write_text("")
    assert root_import_names(tmp_path) == {"kernels", "setup_helper"}


def test_no_installed_distribution_shares_a_name_with_the_root():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in root_import_names(ROOT) - {"fastcps"} if name in installed}
    assert not clashes, f"repository names hide installed distributions: {clashes}"


def _run(code_or_args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_an_installed_kernels_distribution_wins_from_the_root():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` distribution is not installed (transformers < 5.25 does not need it)")
    expected = Path(dist.locate_file("kernels/__init__.py")).resolve()
    got = _run(["-c", "import kernels; print(kernels.__file__)"])
    assert got.returncode == 0, got.stderr
    assert Path(got.stdout.strip()).resolve() == expected, (
        f"`import kernels` from {ROOT} gave {got.stdout.strip()}, not the installed distribution's {expected}"
    )


def test_every_entry_point_and_pipeline_import_starts_from_the_root():
    # Started together: each pays the interpreter's and torch's start-up, which would add up one by one.
    procs = {
        mod: subprocess.Popen(
            [sys.executable, "-m", mod, "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mod in ENTRY_POINTS
    }
    procs["diffusers.FluxPipeline"] = subprocess.Popen(
        [sys.executable, "-c", "from diffusers import FluxPipeline, StableDiffusion3Pipeline"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[name] = err.strip().splitlines()[-3:]
    assert not failed, f"from the repository root: {failed}"


def test_pytest_collects_from_the_root():
    got = _run(["-m", "pytest", "--collect-only", "-q", "tests/test_samplers.py"])
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]


def test_the_training_script_runs_as_the_package_module():
    """`deepspeed fastcps/train.py` runs the file as a script, with fastcps/ first on sys.path, where
    fastcps/kernels (and config.py, logger.py, ...) would be importable as top-level names: the script
    becomes `python -m fastcps.train` before it imports anything of the project's."""
    probe = (
        "import runpy, sys; sys.argv = ['fastcps/train.py', '--help']; "
        "import os; real = os.execv; os.execv = lambda exe, args: print('EXEC', args[1:4], 'fastcps' in "
        "sys.modules) or sys.exit(0); "
        "runpy.run_path('fastcps/train.py', run_name='__main__')"
    )
    got = _run(["-c", probe])
    assert got.returncode == 0 and "EXEC ['-u', '-m', 'fastcps.train'] False" in got.stdout, (
        got.stdout + got.stderr
    )
    script = _run(["fastcps/train.py", "--help"])
    assert script.returncode == 0 and "--config" in script.stdout, script.stderr[-2000:]
