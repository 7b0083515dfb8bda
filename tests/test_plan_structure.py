"""The plan's place in the house: the trainer imports the plan, never the other way round (the plan counts
the trainer's eval through the function the trainer hands it), the plan learns a family from the registry
(no switch on family names to edit for a new model), and its modules stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "fastcps" / "plan"
#: the command line composes the plan with the trainer's eval: the one module of the package that may
#: import the trainer (nothing imports it)
ENTRY = "__main__.py"


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` anywhere in the file names (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_no_plan_module_imports_the_trainer():
    offenders = {
        p.name: sorted(
            m for m in imported_modules(p) if m == "fastcps.trainer" or m.startswith("fastcps.trainer.")
        )
        for p in sorted(PLAN.glob("*.py"))
        if p.name != ENTRY
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, (
        f"fastcps/plan imports the trainer (a circle: the trainer imports the plan): {offenders}"
    )
    assert "fastcps.plan" in imported_modules(ROOT / "fastcps" / "trainer.py")


def test_importing_the_plan_loads_no_trainer():
    code = (
        "import sys; import fastcps.plan, fastcps.plan.epoch, fastcps.plan.report, fastcps.plan.suggest; "
        "print('fastcps.trainer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_plan_has_no_switch_on_family_names():
    """What the plan knows of a family comes from fastcps.policies.families / plan_facts."""
    names = (
        '"flux"',
        '"sd3"',
        '"qwenimage"',
        "'flux'",
        "'sd3'",
        "FluxPolicy",
        "SD3Policy",
        "QwenImagePolicy",
    )
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in sorted(PLAN.glob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(n in line for n in names)
    ]
    assert not found, found


def test_plan_modules_stay_short():
    long = {p.name: n for p in PLAN.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_family_is_registered_once_and_the_diffusion_ones_have_plan_facts():
    import pytest

    from fastcps.policies.families import FAMILIES, Family, registry

    assert {n for n, f in FAMILIES.items() if f.plan} == set(FAMILIES) - {"toy"}
    flux = FAMILIES["flux"]
    with pytest.raises(ValueError, match="registered twice: flux"):
        registry(flux, Family("flux", flux.policy, flux.transformer, flux.lora_targets, flux.example))
