"""The whole loop, pinned: the first epochs of the digits run (``configs/digits_cps.json``, CPU, fp32)
against numbers recorded in ``tests/data/golden_digits_curve.json``, and the same run with the fused
Triton ops (interpreter) against the reference ops (Liger-Kernel's convergence test).

The unit tests pin each piece; these pin what they add up to: a changed advantage, loss, clipping, learning
rate, optimizer, sampler or reward moves these numbers past the tolerances, while the run is bitwise the
same at 1 and 2 threads and the fused ops differ from the reference by ~1e-5 (relative) in the loss.
Seen failing: lr +10 %, clip range +10 %, Adam eps 1e-7, Bessel-corrected group std (the loss moves 3 %,
the rewards do not: Adam is blind to a uniform scale of the advantages), the fused backward 10 % off on 8
columns. A uniform scale of the whole gradient does not show here for the same reason: the kernel tests
(tests/test_cps_logprob_kl.py) pin the gradient itself.
After an intended change of the numbers, re-record with ``python tests/test_golden_curve.py --update``
and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "golden_digits_curve.json"
EPOCHS = 3
RUN = [
    f"train.num_epochs={EPOCHS}",
    f"eval.every={EPOCHS}",
    "eval.num_prompts=4",
    "eval.images_per_prompt=4",
    "log.progress=false",
    "log.tensorboard=false",
    "log.images_every=0",
    "checkpoint.every=0",
]
# key -> (relative, absolute) tolerance. Rewards and eval are smooth in the weights; the loss is a small
# number (~1e-4) summed over clipped terms; clipfrac moves by 1/448 per flipped element.
TOLERANCE = {
    "reward/mean": (1e-4, 1e-6),
    "reward/std": (1e-4, 1e-6),
    "train/loss": (1e-3, 1e-8),
    "train/clipfrac": (0.0, 5e-3),
    "train/ratio_dev": (0.0, 0.0),
    "train/trained_steps": (0.0, 0.0),
    "eval/digit": (1e-4, 1e-6),
    "eval/diversity": (1e-4, 1e-6),
}
_runs: dict[str, dict[int, dict]] = {}


def run_digits(impl: str, out: Path) -> dict[int, dict]:
    """The pinned keys per epoch of the digits run with ``FASTCPS_IMPL=impl``, run in this process."""
    if impl not in _runs:
        from fastcps.train import main

        os.environ["FASTCPS_IMPL"] = impl  # the autouse fixture of conftest.py restores the environment
        sets = RUN + [f"output_dir={out}", f"name={impl}"]
        rc = main(
            ["--config", str(ROOT / "configs" / "digits_cps.json")] + [a for s in sets for a in ("--set", s)]
        )
        assert rc == 0, f"the digits run with FASTCPS_IMPL={impl} exited {rc}"
        rows = [json.loads(x) for x in (out / impl / "metrics.jsonl").read_text().splitlines()]
        _runs[impl] = {r["epoch"]: {k: v for k, v in r.items() if k in TOLERANCE} for r in rows}
    return _runs[impl]


def mismatches(got: dict[int, dict], want: dict[int, dict]) -> list[str]:
    """Every (epoch, key) outside its tolerance, and every key one side has and the other lacks."""
    out = []
    for epoch in sorted(set(got) | set(want)):
        g, w = got.get(epoch, {}), want.get(epoch, {})
        for key in sorted(set(g) | set(w)):
            if key not in g or key not in w:
                out.append(f"epoch {epoch} {key}: only in {'the run' if key in g else 'the golden file'}")
                continue
            rel, abs_ = TOLERANCE[key]
            if not math.isclose(g[key], w[key], rel_tol=rel, abs_tol=abs_):
                diff = abs(g[key] - w[key]) / max(abs(w[key]), 1e-30)
                out.append(
                    f"epoch {epoch} {key}: got {g[key]!r}, expected {w[key]!r} "
                    f"(relative difference {diff:.2e}; tolerance rel {rel:g}, abs {abs_:g})"
                )
    return out


def load_golden() -> dict[int, dict]:
    return {int(k): v for k, v in json.loads(GOLDEN.read_text())["epochs"].items()}


@pytest.mark.slow
def test_digits_run_follows_the_golden_curve(tmp_path):
    bad = mismatches(run_digits("torch", tmp_path), load_golden())
    assert not bad, (
        "the digits run left its golden curve:\n  "
        + "\n  ".join(bad)
        + ("\nif the change of numbers is intended: python tests/test_golden_curve.py --update")
    )


@pytest.mark.slow
def test_fused_ops_train_the_same_curve_as_the_reference_ops(tmp_path):
    reference = run_digits("torch", tmp_path)
    fused = run_digits("triton", tmp_path)  # Triton's interpreter: TRITON_INTERPRET=1 (conftest.py)
    bad = mismatches(fused, reference)
    assert not bad, "fused (triton) vs reference (torch) ops:\n  " + "\n  ".join(bad)


def test_the_comparison_sees_a_changed_curve():
    want = load_golden()
    assert not mismatches(want, want)
    nudged = {e: dict(m) for e, m in want.items()}
    nudged[EPOCHS]["reward/mean"] *= 1 + 3e-4
    assert [m.split(":")[0] for m in mismatches(nudged, want)] == [f"epoch {EPOCHS} reward/mean"]
    del nudged[1]["train/loss"]
    assert any("only in the golden file" in m for m in mismatches(nudged, want))


def update() -> None:
    import tempfile

    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("FASTCPS_COMPILE", "0")
    with tempfile.TemporaryDirectory() as tmp:
        epochs = run_digits("torch", Path(tmp))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(
        json.dumps(
            {
                "made_by": "python tests/test_golden_curve.py --update",
                "run": "python -m fastcps.train --config configs/digits_cps.json "
                + " ".join(f"--set {s}" for s in RUN),
                "impl": "FASTCPS_IMPL=torch FASTCPS_COMPILE=0, CPU, fp32",
                "epochs": {str(e): m for e, m in sorted(epochs.items())},
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit("usage: python tests/test_golden_curve.py --update")
    update()
