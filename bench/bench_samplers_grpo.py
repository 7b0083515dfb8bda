"""The digits GRPO study: which sampler trains best at the same budget (issue 5, part 3).

    nice -n 19 python bench/bench_samplers_grpo.py            # full study, ~25 min on 2 CPU cores

Runs ``python -m fastcps.train --config configs/digits_cps.json`` as subprocesses, one at a time:

- main: ``cps`` (η 0.8), ``flow_sde`` (η 0.7), ``dance_sde`` (η 0.3), each at its default η and
  log-prob form, seeds 0, 1, 2; every run the same budget (epochs × 64 images × 8 steps).
- η ablation: CPS at η 0.2, 0.5, 1.0 (seed 0; η 0.8 is the main run of seed 0).
- log-prob ablation (seed 0): CPS with the Gaussian form, and Flow-SDE with the paper's form, against
  the main runs with their own forms.

Clip range, per log-prob form: the Gaussian log-prob is the paper's form times 1/(2s²) (plus a
constant), and on the toy's 8-step schedule 1/(2s²) is ~1–60 per trained step (Flow-SDE) and ~44
(Dance-SDE): the same parameter step moves log(ratio) ~20× further. We keep the config's 1e-4 for
the paper's form and use 20× that, 2e-3, for the Gaussian form: flow_grpo's ratio (2e-4 for Flow-SDE
vs 1e-5 for CPS). ``--clip-paper`` / ``--clip-gaussian`` change them.

Each run is judged by ``reward/mean`` (the digit reward of the run's own rollouts, what it optimises)
and ``eval/digit`` (ODE samples of the fixed eval set: sampler-neutral), and tracks
``eval/diversity``. Writes: ``docs/figures/samplers_grpo.png`` (curves, mean ± std over seeds),
``docs/figures/samplers_grpo_ablations.png``, ``bench/results/samplers_grpo.csv`` (one row per run),
``bench/results/samplers_grpo/<run>.jsonl`` (each run's metrics; the run directory itself is deleted),
and prints the tables. A run whose metrics file already exists is not run again (``--rerun`` forces).

"Epochs to 90%": the first epoch at which the seed-mean curve reaches 90% of the best sampler's final
value (own reward: its 3-epoch running mean). The own-sampler reward is not comparable across
samplers (a noisy sampler's rollouts score lower before any training); the ODE eval is. The mean
``train/clipfrac`` is reported to show how tight each run's trust region was in practice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_ETA,
    DEFAULT_FORM,
    LABEL,
    REPO,
    RESULTS,
    append_csv,
    meta,
    read_run_metrics,
    study_overrides,
)

COLUMNS = [
    "timestamp",
    "device",
    "threads",
    "torch",
    "fastcps",
    "commit",
    "study",
    "run",
    "sampler",
    "eta",
    "logprob",
    "clip_range",
    "seed",
    "epochs",
    "images_per_epoch",
    "num_steps",
    "final_reward_own",
    "final_reward_own_last3",
    "final_eval_digit",
    "final_eval_diversity",
    "base_eval_digit",
    "mean_clipfrac",
    "wall_s",
]


def run_spec(study: str, sampler: str, eta: float, form: str, seed: int, args) -> dict:
    clip = args.clip_paper if form == "paper" else args.clip_gaussian
    name = f"{sampler}_eta{eta:g}_{form}_s{seed}"
    return {
        "study": study,
        "run": name,
        "sampler": sampler,
        "eta": eta,
        "logprob": form,
        "clip_range": clip,
        "seed": seed,
    }


def plan(args) -> list[dict]:
    specs = [
        run_spec("main", s, DEFAULT_ETA[s], DEFAULT_FORM[s], seed, args)
        for s in args.samplers
        for seed in args.seeds
    ]
    if args.logprob_ablation:
        specs.append(run_spec("logprob", "cps", DEFAULT_ETA["cps"], "gaussian", args.seeds[0], args))
        specs.append(run_spec("logprob", "flow_sde", DEFAULT_ETA["flow_sde"], "paper", args.seeds[0], args))
    for eta in args.eta_ablation:
        if not math.isclose(eta, DEFAULT_ETA["cps"]) or "cps" not in args.samplers:
            specs.append(run_spec("eta", "cps", eta, "paper", args.seeds[0], args))
    return specs


def run_one(spec: dict, args, run_root: Path, metrics_dir: Path) -> Path:
    dest = metrics_dir / f"{spec['run']}.jsonl"
    if dest.exists() and not args.rerun:
        print(f"[bench] {spec['run']}: metrics exist ({dest}), not re-run", flush=True)
        return dest
    cmd = [
        sys.executable,
        "-m",
        "fastcps.train",
        "--config",
        args.config,
        *study_overrides(spec, run_root, args.epochs, args.eval_every, args.set),
    ]
    env = dict(
        os.environ,
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
    )
    t0 = time.perf_counter()
    print(f"[bench] {spec['run']} ...", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    run_dir = run_root / spec["run"]
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(
            f"[bench] run {spec['run']} failed with exit code {proc.returncode}: {' '.join(cmd)}"
        )
    metrics_dir.mkdir(parents=True, exist_ok=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines.append(json.dumps({"bench/wall_s": wall, "bench/spec": spec}))
    dest.write_text("\n".join(lines) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints etc.: only the metrics are kept
    print(f"[bench] {spec['run']} done in {wall:.0f} s", flush=True)
    return dest


def read_metrics(path: Path) -> dict:
    """{"reward": {epoch: v}, "eval": {epoch: v}, "div": {epoch: v}, "clipfrac": {...}, "wall_s": s}."""
    return read_run_metrics(
        path,
        {
            "reward": "reward/mean",
            "eval": "eval/digit",
            "div": "eval/diversity",
            "clipfrac": "train/clipfrac",
        },
    )


def mean_clipfrac(r: dict) -> float:
    return float(np.mean(list(r["clipfrac"].values()))) if r["clipfrac"] else float("nan")


def curve(runs: list[dict], key: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    epochs = sorted(set.intersection(*(set(r[key]) for r in runs)))
    vals = np.array([[r[key][e] for e in epochs] for r in runs])
    return epochs, vals.mean(0), vals.std(0)


def final_own(r: dict, last: int = 3) -> float:
    eps = sorted(r["reward"])[-last:]
    return float(np.mean([r["reward"][e] for e in eps]))


def epochs_to(epochs: list[int], mean: np.ndarray, threshold: float):
    hit = [e for e, m in zip(epochs, mean) if m >= threshold]
    return hit[0] if hit else None


def summarize(specs: list[dict], metrics_dir: Path, args) -> dict:
    data = {s["run"]: {**s, **read_metrics(metrics_dir / f"{s['run']}.jsonl")} for s in specs}
    groups: dict[str, list[dict]] = {}
    for s in specs:
        if s["study"] == "main":
            groups.setdefault(s["sampler"], []).append(data[s["run"]])
    table = []
    for sampler, runs in groups.items():
        own = [final_own(r) for r in runs]
        ev = [r["eval"][max(r["eval"])] for r in runs]
        dv = [r["div"][max(r["div"])] for r in runs]
        table.append(
            {
                "sampler": sampler,
                "seeds": len(runs),
                "own": (np.mean(own), np.std(own)),
                "eval": (np.mean(ev), np.std(ev)),
                "div": (np.mean(dv), np.std(dv)),
                "base": np.mean([r["eval"][0] for r in runs]),
                "wall": np.mean([r["wall_s"] for r in runs]),
                "clipfrac": np.mean([mean_clipfrac(r) for r in runs]),
            }
        )
    best_own = max(t["own"][0] for t in table)
    best_eval = max(t["eval"][0] for t in table)
    for t in table:
        runs = groups[t["sampler"]]
        ep, m, _ = curve(runs, "reward")
        # a 3-epoch running mean: single epochs of 64 rollouts are noisy
        sm = np.array([m[max(0, i - 2) : i + 1].mean() for i in range(len(m))])
        t["to90_own"] = epochs_to(ep, sm, 0.9 * best_own)
        ep, m, _ = curve(runs, "eval")
        t["to90_eval"] = epochs_to(ep, m, 0.9 * best_eval)
    return {"data": data, "groups": groups, "table": table, "best_own": best_own, "best_eval": best_eval}


def fmt_pm(x) -> str:
    return f"{x[0]:.3f} ± {x[1]:.3f}"


def print_tables(summary: dict, specs: list[dict]) -> str:
    lines = [
        (
            "| sampler | seeds | own-sampler reward (last 3 epochs) | ODE eval/digit (final) | "
            "eval/diversity (final) | "
            "epochs to 90% of best own | epochs to 90% of best eval | mean clipfrac | wall s/run |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary["table"]:
        lines.append(
            f"| {LABEL.get(t['sampler'], t['sampler'])} | {t['seeds']} | {fmt_pm(t['own'])} | "
            f"{fmt_pm(t['eval'])} | "
            f"{fmt_pm(t['div'])} | {t['to90_own'] if t['to90_own'] is not None else 'not reached'} | "
            f"{t['to90_eval'] if t['to90_eval'] is not None else 'not reached'} | {t['clipfrac']:.3f} | "
            f"{t['wall']:.0f} |"
        )
    base = np.mean([r["eval"][0] for r in summary["data"].values()])
    lines.append(
        f"\nbase model eval/digit {base:.3f}; best own {summary['best_own']:.3f} (90%: "
        f"{0.9 * summary['best_own']:.3f}); best eval {summary['best_eval']:.3f} (90%: "
        f"{0.9 * summary['best_eval']:.3f}). ± is the std over seeds."
    )
    abl = [
        s
        for s in specs
        if s["study"] != "main" or (s["seed"] == specs[0]["seed"] and s["sampler"] in ("cps", "flow_sde"))
    ]
    if any(s["study"] != "main" for s in specs):
        lines += [
            "",
            "| study | sampler | η | log-prob | clip | seed | own reward (last 3) | ODE eval/digit | "
            "eval/diversity "
            "| mean clipfrac |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sorted(abl, key=lambda s: (s["sampler"], s["logprob"], s["eta"])):
            r = summary["data"][s["run"]]
            lines.append(
                f"| {s['study']} | {s['sampler']} | {s['eta']:g} | {s['logprob']} | {s['clip_range']:g} | "
                f"{s['seed']} | {final_own(r):.3f} | {r['eval'][max(r['eval'])]:.3f} | "
                f"{r['div'][max(r['div'])]:.3f} | {mean_clipfrac(r):.3f} |"
            )
    text = "\n".join(lines)
    print(text)
    return text


def plot(summary: dict, specs: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cps": "tab:blue", "flow_sde": "tab:red", "dance_sde": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for sampler, runs in summary["groups"].items():
        for ax, key in zip(axes, ("reward", "eval", "div")):
            ep, m, sd = curve(runs, key)
            c = colors.get(sampler)
            ax.plot(ep, m, "o-", ms=3, color=c, label=f"{LABEL.get(sampler, sampler)}, {len(runs)} seeds")
            ax.fill_between(ep, m - sd, m + sd, color=c, alpha=0.2)
    for ax, title in zip(
        axes,
        (
            "own-sampler rollout reward (reward/mean)",
            "ODE eval reward (eval/digit)",
            "ODE eval diversity (eval/diversity)",
        ),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Digits GRPO: mean ± std over seeds, same budget per run", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "samplers_grpo.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    etas = sorted(
        [
            s
            for s in specs
            if s["sampler"] == "cps" and s["logprob"] == "paper" and s["seed"] == specs[0]["seed"]
        ],
        key=lambda s: s["eta"],
    )
    lp = [s for s in specs if s["study"] == "logprob"]
    if len(etas) > 1 or lp:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if len(etas) > 1:
            d = summary["data"]
            x = [s["eta"] for s in etas]
            axes[0].plot(
                x, [final_own(d[s["run"]]) for s in etas], "o-", label="own-sampler reward (last 3 epochs)"
            )
            axes[0].plot(
                x, [d[s["run"]]["eval"][max(d[s["run"]]["eval"])] for s in etas], "s-", label="ODE eval/digit"
            )
            axes[0].set_xlabel("CPS η")
            axes[0].set_title(f"CPS η ablation (seed {specs[0]['seed']})", fontsize=10)
            axes[0].legend(fontsize=8)
            axes[0].grid(alpha=0.3)
        for s in lp + [
            x
            for x in specs
            if x["study"] == "main"
            and x["seed"] == specs[0]["seed"]
            and x["sampler"] in {y["sampler"] for y in lp}
        ]:
            r = summary["data"][s["run"]]
            ep = sorted(r["eval"])
            axes[1].plot(
                ep,
                [r["eval"][e] for e in ep],
                "o-" if s["logprob"] == "paper" else "s--",
                color=colors.get(s["sampler"]),
                label=f"{s['sampler']} {s['logprob']} log-prob (clip {s['clip_range']:g})",
            )
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("ODE eval/digit")
        axes[1].set_title("log-prob ablation: paper form vs Gaussian form", fontsize=10)
        axes[1].legend(fontsize=7)
        axes[1].grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / "samplers_grpo_ablations.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits_cps.json")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samplers", default="cps,flow_sde,dance_sde")
    ap.add_argument(
        "--eta-ablation", default="0.2,0.5,0.8,1.0", help="CPS η values (seed = first seed); '' = none"
    )
    ap.add_argument("--no-logprob-ablation", dest="logprob_ablation", action="store_false")
    ap.add_argument("--clip-paper", type=float, default=1e-4)
    ap.add_argument("--clip-gaussian", type=float, default=2e-3)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra trainer override for every run (e.g. train.prompts_per_epoch=2)",
    )
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per trainer run")
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_samplers_grpo"))
    ap.add_argument("--metrics-dir", default=str(RESULTS / "samplers_grpo"))
    ap.add_argument("--csv", default=str(RESULTS / "samplers_grpo.csv"))
    ap.add_argument("--fig-dir", default=str(REPO / "docs" / "figures"))
    ap.add_argument("--rerun", action="store_true", help="re-run runs whose metrics already exist")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: tables and figures from the runs whose metrics exist",
    )
    args = ap.parse_args(argv)
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.samplers = [x for x in args.samplers.split(",") if x]
    args.eta_ablation = _floats(args.eta_ablation)
    torch.set_num_threads(1)

    specs = plan(args)
    run_root, metrics_dir = Path(args.runs_dir), Path(args.metrics_dir)
    print(f"[bench] {len(specs)} runs, {args.epochs} epochs each, eval every {args.eval_every}", flush=True)
    fresh = set()
    if args.summary_only:
        specs = [s for s in specs if (metrics_dir / f"{s['run']}.jsonl").exists()]
        print(f"[bench] --summary-only: {len(specs)} runs have metrics", flush=True)
    else:
        for spec in specs:
            dest = metrics_dir / f"{spec['run']}.jsonl"
            if args.rerun or not dest.exists():
                fresh.add(spec["run"])
            run_one(spec, args, run_root, metrics_dir)
    # CSV rows: every run made now, and any finished run not recorded yet (an interrupted study)
    if Path(args.csv).exists():
        import csv

        with open(args.csv, newline="") as f:
            recorded = {r["run"] for r in csv.DictReader(f)}
        fresh |= {s["run"] for s in specs if s["run"] not in recorded}
    else:
        fresh |= {s["run"] for s in specs}
    summary = summarize(specs, metrics_dir, args)
    m = meta(torch.device("cpu"))
    m["threads"] = args.threads
    cfg = (
        json.loads((REPO / args.config).read_text())
        if not Path(args.config).is_absolute()
        else json.loads(Path(args.config).read_text())
    )
    over = dict(kv.split("=", 1) for kv in args.set)
    images = int(over.get("train.prompts_per_epoch", cfg["train"]["prompts_per_epoch"])) * int(
        over.get("train.images_per_prompt", cfg["train"]["images_per_prompt"])
    )
    steps = int(over.get("sampler.num_steps", cfg["sampler"]["num_steps"]))
    rows = []
    for s in specs:
        if s["run"] not in fresh:
            continue
        r = summary["data"][s["run"]]
        rows.append(
            {
                **m,
                **s,
                "epochs": args.epochs,
                "images_per_epoch": images,
                "num_steps": steps,
                "final_reward_own": f"{r['reward'][max(r['reward'])]:.4f}",
                "final_reward_own_last3": f"{final_own(r):.4f}",
                "final_eval_digit": f"{r['eval'][max(r['eval'])]:.4f}",
                "final_eval_diversity": f"{r['div'][max(r['div'])]:.4f}",
                "base_eval_digit": f"{r['eval'][0]:.4f}",
                "mean_clipfrac": f"{mean_clipfrac(r):.4f}",
                "wall_s": f"{r['wall_s']:.1f}",
            }
        )
    if rows:
        append_csv(args.csv, rows, COLUMNS)
    text = print_tables(summary, specs)
    for p in plot(summary, specs, Path(args.fig_dir)):
        print(f"wrote {p}")
    summary["text"] = text
    return summary


if __name__ == "__main__":
    main()
