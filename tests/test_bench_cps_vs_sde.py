"""bench/bench_cps_vs_sde.py (issue 19) without training: the matched clip range, the plan and its
resumption, and the report on synthetic metrics files."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_cps_vs_sde as b  # noqa: E402


def test_matched_clip_interpolates_in_log_clip():
    pts = [(1e-4, 0.4), (2e-4, 0.2), (4e-4, 0.1)]
    assert b.matched_clip(pts, 0.2) == (2e-4, "interpolated")
    c, note = b.matched_clip(pts, 0.3)  # halfway between 1e-4 and 2e-4 in log: 1.41e-4
    assert note == "interpolated" and c == pytest.approx(1.4e-4)
    c, note = b.matched_clip(pts, 0.05)  # beyond the sweep: extrapolated from the last two points
    assert note == "extrapolated" and c == pytest.approx(5.7e-4)  # 2e-4 · 2^1.5
    assert b.matched_clip([(1e-4, 0.4), (2e-4, 0.39)], 0.1) == (
        4e-4,
        "extrapolated",
    )  # at most 2× past the end


def _args(tmp_path: Path, **kw) -> Namespace:
    a = dict(
        phases=["sweep", "main", "eta", "paper"],
        seeds=[0, 1],
        samplers=["cps", "flow_sde"],
        rewards=list(b.REWARDS),
        epochs=2,
        eval_every=1,
        sweep_epochs=1,
        target_clipfrac=0.2,
        etas=[0.4, 0.8],
        eta_seeds=1,
        paper_seeds=1,
        sweep_clips={"paper": (1e-4, 2e-4), "gaussian": (1e-3, 2e-3)},
        set=[],
        metrics_dir=str(tmp_path),
    )
    a.update(kw)
    return Namespace(**a)


def _write(path: Path, sp: dict, clipfrac: float, own=(0.5, 0.6, 0.55)) -> None:
    other = b.other_reward(sp["reward"])
    rows = [{"epoch": 0, f"eval/{sp['reward']}": 0.5, f"eval/{other}": 0.5, "eval/diversity": 5.0}]
    for e, r in enumerate(own, 1):
        rows.append(
            {
                "epoch": e,
                "reward/mean": r,
                f"reward/{other}/mean": r,
                "train/clipfrac": clipfrac,
                f"eval/{sp['reward']}": r,
                f"eval/{other}": r - 0.1,
                "eval/diversity": 5.0 - 0.5 * e,
            }
        )
    rows.append({"bench/wall_s": 3.0, "bench/spec": sp})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_plan_waits_for_the_sweep_then_uses_the_matched_clips(tmp_path):
    args = _args(tmp_path)
    specs = b.plan(args, tmp_path)
    assert [s["phase"] for s in specs] == ["sweep"] * 4 + ["paper"] * 4  # main/eta wait; paper: 1 seed
    for sp in specs[:4]:
        frac = {1e-4: 0.3, 2e-4: 0.1, 1e-3: 0.4, 2e-3: 0.2}[sp["clip_range"]]
        _write(tmp_path / f"{sp['run']}.jsonl", sp, frac)
    specs = b.plan(args, tmp_path)
    main = [s for s in specs if s["phase"] == "main"]
    assert len(main) == 2 * 2 * 2 and {s["clip_range"] for s in main if s["sampler"] == "cps"} == {1.4e-4}
    assert {s["clip_range"] for s in main if s["sampler"] == "flow_sde"} == {2e-3}
    eta = [s for s in specs if s["phase"] == "eta"]
    assert [(s["eta"], s["seed"], s["reward"]) for s in eta] == [(0.4, 0, "digit_clean_trained")]
    assert [s["phase"] for s in specs][4:] == ["main"] * 8 + ["eta"] + ["paper"] * 4  # the order asked for
    assert [(s["reward"], s["seed"], s["sampler"]) for s in main[:3]] == [
        ("digit_clean_trained", 0, "cps"),
        ("digit_clean_trained", 0, "flow_sde"),
        ("digit_clean_trained", 1, "cps"),
    ]
    assert len({s["run"] for s in specs}) == len(specs)


def test_report_pairs_by_seed_and_lists_what_is_left(tmp_path, capsys):
    args = _args(
        tmp_path,
        phases=["main"],
        samplers=["cps", "flow_sde", "dance_sde"],
        sweep_clips={"paper": (1e-4, 2e-4), "gaussian": (1e-3, 2e-3)},
    )
    for sp in b.sweep_specs(args):
        _write(tmp_path / f"{sp['run']}.jsonl", sp, 0.3 if sp["clip_range"] in (1e-4, 1e-3) else 0.1)
    specs = b.plan(args, tmp_path)
    for sp in specs:
        if sp["seed"] == 1 and sp["sampler"] == "dance_sde":
            continue  # not finished
        own = (0.6, 0.7, 0.8) if sp["sampler"] == "cps" else (0.5, 0.55, 0.6 + 0.01 * sp["seed"])
        _write(tmp_path / f"{sp['run']}.jsonl", sp, 0.2, own)
    from cps_vs_sde_report import report

    (tmp_path / "m").mkdir()
    for p in tmp_path.glob("*.jsonl"):
        p.rename(tmp_path / "m" / p.name)
    args.metrics_dir = str(tmp_path / "m")
    m = tmp_path / "m"
    text = report(b.plan(args, m), args, m, tmp_path, "t", b.matched_clips(args, m), b.DEFAULT_ETA["cps"])
    assert "Runs not finished (2)" in text and "main_digit_clean_trained_dance_sde" in text
    # own last 3: CPS 0.7, Flow-SDE 0.55 + 0.01·seed/3 -> paired differences +0.150 and +0.1467
    row = [ln for ln in text.splitlines() if "CPS − Flow-SDE | own-sampler reward" in ln][0]
    assert "| 2 | +0.148 |" in row and row.endswith("CPS higher |")
    assert (tmp_path / "t.png").exists() and (tmp_path / "t.csv").exists()
    assert "Matched clip ranges: cps 0.00014 (interpolated), flow_sde 0.0014 (interpolated)" in text
