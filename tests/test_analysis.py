"""Numbers of the analyses (issue 5): the paper's Figure 2 values (docs/math.md), exact coefficient
preservation,
Theorem 1's convergence, and each analysis script on a tiny budget (the studies are benchmarks)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastcps.analysis import FLUX_MU_512, flux_mu, noise_level_table, total_noise
from fastcps.analysis.theorem1 import coeff_gap, fit_order
from fastcps.samplers import step_coeffs
from fastcps.schedule import flow_sigmas

REPO = Path(__file__).resolve().parents[1]


def test_figure2_values_of_math_md():
    t10 = noise_level_table("sd3", 10)
    assert [round(s, 3) for s in t10["sigmas"]] == [
        1,
        0.964,
        0.923,
        0.875,
        0.818,
        0.75,
        0.667,
        0.562,
        0.429,
        0.25,
        0,
    ]
    assert t10["Flow-SDE (η 0.7)"][-1] == pytest.approx(0.218, abs=5e-4)
    assert t10["Dance-SDE (η 0.3)"][-1] == pytest.approx(0.157, abs=5e-4)
    assert t10["CPS (η 0.8)"][-1] == 0.0
    assert total_noise("cps", 0.25, 0.0, 0.7, 0.964) == 0.0  # docs/math.md: CPS at η 0.7
    t4 = noise_level_table("sd3", 4)
    assert t4["Flow-SDE (η 0.7)"][-1] == pytest.approx(0.552, abs=5e-4)


def test_cpws_marked_undefined_not_crashing():
    t = noise_level_table("sd3", 10)
    cpws = t["CPWS (η 0.7)"]
    assert math.isnan(cpws[-1])  # σ' = 0 < s
    assert all(not math.isnan(v) for v in cpws[:8])


def test_flux_mu_matches_diffusers():
    # diffusers.pipelines.flux.pipeline_flux.calculate_shift(1024, 256, 4096, 0.5, 1.15) = 0.63
    # (not imported here: the FLUX pipeline module takes ~7 s to import)
    assert FLUX_MU_512 == pytest.approx(0.63)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("schedule", [{"mu": FLUX_MU_512}, {"shift": 3.0}, {"shift": 1.0}])
@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_coefficients_preserved_exactly(schedule, n):
    sig = flow_sigmas(n, **schedule).double()
    for i in range(n):
        s, s1 = sig[i : i + 1], sig[i + 1 : i + 2]
        cases = [("cps", 0.8), ("cps", 0.3), ("cps", 1.0), ("dpmpp1_sde", None)]
        try:
            step_coeffs("cpws", s, s1, 0.7, sigma_max=sig[1])
            cases.append(("cpws", 0.7))
        except ValueError:
            pass
        for name, eta in cases:
            c = step_coeffs(name, s, s1, eta, sigma_max=sig[1])
            # fp32 coefficients: exact up to one or two ulps of σ'
            assert float(c.a0) == pytest.approx(1.0 - float(s1), abs=1e-7)
            assert math.hypot(float(c.a1), float(c.s)) == pytest.approx(float(s1), abs=2e-7), (name, i)
        for name in ("flow_sde", "dance_sde"):  # eq. 11: strictly more noise than σ'
            c = step_coeffs(name, s, s1, None, sigma_max=sig[1])
            assert math.hypot(float(c.a1), float(c.s)) > float(s1)


def test_theorem1_interior_gap_is_second_order():
    gaps = [coeff_gap(flow_sigmas(n).double(), 0.7, "interior")["max_a1_gap"] for n in (32, 64, 128, 256)]
    assert all(b < a for a, b in itertools.pairwise(gaps))
    assert fit_order([32, 64, 128, 256], gaps) == pytest.approx(2.0, abs=0.25)
    sums = [coeff_gap(flow_sigmas(n).double(), 0.7, "interior")["sum_a1_gap"] for n in (32, 64, 128, 256)]
    assert fit_order([32, 64, 128, 256], sums) == pytest.approx(1.0, abs=0.25)
    # Flow-GRPO's first step keeps s = η whatever N: its gap does not vanish (why 'interior' exists)
    for n in (16, 256):
        sig = flow_sigmas(n).double()
        assert float(step_coeffs("flow_sde", 1.0, sig[1], 0.7, sigma_max=sig[1]).s) == pytest.approx(
            0.7, rel=1e-5
        )


def test_fit_order_exact():
    assert fit_order([2, 4, 8], [1 / 4, 1 / 16, 1 / 64]) == pytest.approx(2.0)


def test_high_freq_energy():
    from fastcps.analysis import high_freq_energy

    flat = torch.full((2, 3, 16, 16), 0.5)
    assert torch.all(high_freq_energy(flat) == 0)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 3, 16, 16)
    assert float(high_freq_energy(checker)[0]) > 0.9 * float((checker[0, 0] - 0.5).pow(2).sum())


def _run_cli(argv, tmp_path):
    from fastcps.analysis.__main__ import main

    main([*argv, "--out-dir", str(tmp_path)])


def test_noise_levels_cli(tmp_path, capsys):
    _run_cli(["noise-levels"], tmp_path)
    assert (tmp_path / "noise_levels.png").stat().st_size > 0
    tables = json.loads((tmp_path / "noise_levels.json").read_text())
    assert len(tables) == 4 and "undef" in capsys.readouterr().out


def test_theorem1_and_residual_noise_cli_tiny(tmp_path):
    _run_cli(["theorem1", "--steps", "8,16", "--samples", "2"], tmp_path)
    res = json.loads((tmp_path / "theorem1.json").read_text())
    assert len(res["rows"]) == 4 and (tmp_path / "theorem1.png").exists()
    _run_cli(["residual-noise", "--steps", "2,3", "--noises-per-digit", "1"], tmp_path)
    rows = json.loads((tmp_path / "residual_noise.json").read_text())
    ode = [r for r in rows if r["sampler"] == "ode"]
    assert all(r["hf_ratio"] == 1.0 for r in ode) and all(r["last_step_noise"] == 0 for r in ode)
    assert all(r["last_step_noise"] == 0 for r in rows if r["sampler"] == "cps")
    assert (tmp_path / "residual_noise.png").exists()


def test_reward_noise_cli_tiny(tmp_path):
    """The reward-noise figure's numbers (issue 19): the clean-trained classifier loses more to added noise
    than the noise-augmented one, the ODE row is its own reference, and CPS's base samples beat the ODE's
    under both (the figure in docs/results.md part 3b)."""
    _run_cli(["reward-noise", "--noises-per-digit", "2"], tmp_path)
    res = json.loads((tmp_path / "reward_noise.json").read_text())
    noise = {r["level"]: r for r in res["added_noise"]}
    drop = {k: noise[0.0][k] - noise[0.5][k] for k in ("digit", "digit_clean_trained")}
    assert drop["digit_clean_trained"] > 1.5 * drop["digit"] > 0
    rows = {r["sampler"]: r for r in res["rollouts"]}
    assert (
        rows["ode"]["hf_ratio"] == 1.0 and rows["ode"]["digit_vs_ode"] == 0.0 and rows["ode"]["images"] == 20
    )
    assert rows["flow_sde"]["hf_ratio"] > 1.0 > rows["cps"]["hf_ratio"]
    assert (tmp_path / "reward_noise.png").exists()


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_samplers_grpo", REPO / "bench" / "bench_samplers_grpo.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_samplers_grpo"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_samplers_grpo_plan_and_summary(tmp_path):
    """The study's plan and its tables/plots from synthetic metrics (no training)."""
    bench = _load_bench()
    args = bench.argparse.Namespace(
        samplers=["cps", "flow_sde"],
        seeds=[0, 1],
        eta_ablation=[0.2, 0.8],
        logprob_ablation=True,
        clip_paper=1e-4,
        clip_gaussian=2e-3,
    )
    specs = bench.plan(args)
    assert len(specs) == 4 + 1 + 2
    assert {s["clip_range"] for s in specs if s["logprob"] == "gaussian"} == {2e-3}
    for k, s in enumerate(specs):
        lines = [{"epoch": 0, "eval/digit": 0.5, "eval/diversity": 5.0}]
        lines += [{"epoch": e, "reward/mean": 0.5 + 0.02 * e + 0.01 * k} for e in (1, 2, 3)]
        lines += [{"epoch": 3, "eval/digit": 0.6 + 0.01 * k, "eval/diversity": 4.8}, {"bench/wall_s": 1.0}]
        (tmp_path / f"{s['run']}.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    summary = bench.summarize(specs, tmp_path, args)
    assert {t["sampler"] for t in summary["table"]} == {"cps", "flow_sde"}
    text = bench.print_tables(summary, specs)
    assert "epochs to 90%" in text
    paths = bench.plot(summary, specs, tmp_path / "fig")
    assert [p.name for p in paths] == ["samplers_grpo.png", "samplers_grpo_ablations.png"]


@pytest.mark.slow
def test_bench_samplers_grpo_runs_tiny(tmp_path):
    """One real trainer run through the script on a tiny budget (~15 s: DeepSpeed start-up)."""
    bench = _load_bench()
    s = bench.main(
        [
            "--epochs",
            "1",
            "--eval-every",
            "1",
            "--seeds",
            "0",
            "--samplers",
            "cps",
            "--eta-ablation",
            "",
            "--no-logprob-ablation",
            "--set",
            "train.prompts_per_epoch=2",
            "--set",
            "train.images_per_prompt=2",
            "--set",
            "train.rollout_batch_size=4",
            "--set",
            "train.minibatch_size=4",
            "--set",
            "sampler.num_steps=2",
            "--set",
            "eval.num_prompts=2",
            "--set",
            "eval.images_per_prompt=2",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--metrics-dir",
            str(tmp_path / "m"),
            "--csv",
            str(tmp_path / "r.csv"),
            "--fig-dir",
            str(tmp_path / "fig"),
        ]
    )
    assert (tmp_path / "fig" / "samplers_grpo.png").exists() and (tmp_path / "r.csv").exists()
    assert not (tmp_path / "runs" / "cps_eta0.8_paper_s0").exists()  # run dir removed, metrics kept
    assert len(s["table"]) == 1
