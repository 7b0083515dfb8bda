"""Tables, CSV and figures of ``bench/bench_cps_vs_sde.py`` (issue 19), from the runs that have finished.

Per arm (phase × training reward × sampler), over seeds: own-sampler reward (``reward/mean``, mean of
the last 3 epochs), ODE eval on the training reward and on the other reward (final eval), eval
diversity (final), epochs to 90 % of the best arm's final own reward (seed-mean curve, 3-epoch running
mean), mean ``train/clipfrac``, stability (largest epoch-to-epoch drop of the own reward; the lowest eval
diversity relative to the base model's), wall seconds per run. ± is a 95 % t-interval half-width of the
mean over seeds. CPS − Flow-SDE and CPS − Dance-SDE are paired by seed: mean, 95 % t-interval and a
95 % percentile bootstrap interval (10,000 resamples of the seeds, fixed generator).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from common import LABEL, read_run_metrics

COLORS = {"cps": "tab:blue", "flow_sde": "tab:red", "dance_sde": "tab:orange"}
CSV_COLUMNS = [
    "phase",
    "run",
    "reward",
    "sampler",
    "eta",
    "logprob",
    "clip_range",
    "seed",
    "epochs",
    "own_last3",
    "eval_train_reward",
    "eval_other_reward",
    "eval_diversity",
    "base_eval_train_reward",
    "base_diversity",
    "mean_clipfrac",
    "max_own_drop",
    "min_div_ratio",
    "wall_s",
]


def tq(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def ci(x) -> tuple[float, float]:
    x = np.asarray(x, float)
    return float(x.mean()), (
        tq(len(x)) * float(x.std(ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    )


def boot(x, n: int = 10000) -> tuple[float, float]:
    x = np.asarray(x, float)
    rng = np.random.default_rng(0)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def load(sp: dict, metrics_dir: Path) -> dict | None:
    p = metrics_dir / f"{sp['run']}.jsonl"
    if not p.exists():
        return None
    other = "digit" if sp["reward"] == "digit_clean_trained" else "digit_clean_trained"
    r = read_run_metrics(
        p,
        {
            "own": "reward/mean",
            "own_other": f"reward/{other}/mean",
            "eval": f"eval/{sp['reward']}",
            "eval_other": f"eval/{other}",
            "div": "eval/diversity",
            "clipfrac": "train/clipfrac",
        },
    )
    own = [r["own"][e] for e in sorted(r["own"])]
    r["own_last3"] = float(np.mean(own[-3:]))
    r["max_own_drop"] = float(max([a - b for a, b in zip(own, own[1:])] + [0.0]))
    r["mean_clipfrac"] = float(np.mean(list(r["clipfrac"].values()))) if r["clipfrac"] else float("nan")
    if r["eval"]:
        last = max(r["eval"])
        r["eval_final"], r["eval_other_final"], r["div_final"] = (
            r["eval"][last],
            r["eval_other"][last],
            r["div"][last],
        )
        r["min_div_ratio"] = min(r["div"].values()) / r["div"][0]
    return {**sp, **r}


def curve(runs: list[dict], key: str):
    epochs = sorted(set.intersection(*(set(r[key]) for r in runs)))
    vals = np.array([[r[key][e] for e in epochs] for r in runs])
    m = vals.mean(0)
    h = tq(len(runs)) * vals.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(m)
    return epochs, m, h


def arms(data: list[dict], phase: str) -> dict:
    out: dict = {}
    for r in data:
        if r["phase"] == phase and "eval_final" in r:
            out.setdefault((r["reward"], r["sampler"]), []).append(r)
    return out


def fmt(x: tuple[float, float]) -> str:
    return f"{x[0]:.3f} ± {x[1]:.3f}" if np.isfinite(x[1]) else f"{x[0]:.3f}"


def arm_table(groups: dict, rewards: list[str], samplers: list[str]) -> list[str]:
    lines = [
        "| reward trained on | sampler | seeds | own-sampler reward (last 3) | ODE eval, trained reward | "
        "ODE eval, other reward | eval diversity | epochs to 90% of best own | epochs to 90% of best eval | "
        "mean clipfrac | largest own drop | lowest diversity / base | wall s/run |",
        "|" + "---|" * 13,
    ]
    for rw in rewards:
        arm = {s: groups[(rw, s)] for s in samplers if (rw, s) in groups}
        if not arm:
            continue
        best = max(np.mean([r["own_last3"] for r in runs]) for runs in arm.values())
        best_eval = max(np.mean([r["eval_final"] for r in runs]) for runs in arm.values())
        for s, runs in arm.items():
            ep, m, _ = curve(runs, "own")
            sm = [m[max(0, i - 2) : i + 1].mean() for i in range(len(m))]
            hit = [e for e, v in zip(ep, sm) if v >= 0.9 * best]
            ep, m, _ = curve(runs, "eval")
            hit_eval = [e for e, v in zip(ep, m) if v >= 0.9 * best_eval]
            col = lambda key: [r[key] for r in runs]  # noqa: E731
            cells = [
                rw,
                LABEL[s],
                len(runs),
                fmt(ci(col("own_last3"))),
                fmt(ci(col("eval_final"))),
                fmt(ci(col("eval_other_final"))),
                fmt(ci(col("div_final"))),
                hit[0] if hit else "not reached",
                hit_eval[0] if hit_eval else "not reached",
                f"{np.mean(col('mean_clipfrac')):.3f}",
                f"{np.mean(col('max_own_drop')):.3f} (worst {max(col('max_own_drop')):.3f})",
                f"{np.mean(col('min_div_ratio')):.3f}",
                f"{np.mean(col('wall_s')):.0f}",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def paired_table(groups: dict, rewards: list[str]) -> list[str]:
    lines = [
        "| reward trained on | difference | metric | seeds | mean | 95% t-interval | 95% bootstrap | "
        "verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rw in rewards:
        for other in ("flow_sde", "dance_sde"):
            a = {r["seed"]: r for r in groups.get((rw, "cps"), [])}
            b = {r["seed"]: r for r in groups.get((rw, other), [])}
            seeds = sorted(set(a) & set(b))
            if len(seeds) < 2:
                continue
            for key, name in (
                ("own_last3", "own-sampler reward"),
                ("eval_final", "ODE eval, trained reward"),
                ("eval_other_final", "ODE eval, other reward"),
                ("div_final", "eval diversity"),
            ):
                d = [a[s][key] - b[s][key] for s in seeds]
                m, h = ci(d)
                lo, hi = boot(d)
                verdict = "CPS higher" if m - h > 0 else ("CPS lower" if m + h < 0 else "not separable")
                lines.append(
                    f"| {rw} | CPS − {LABEL[other].split(' ')[0]} | {name} | {len(seeds)} | {m:+.3f} | "
                    f"[{m - h:+.3f}, {m + h:+.3f}] | [{lo:+.3f}, {hi:+.3f}] | {verdict} |"
                )
    return lines


def plot_curves(groups: dict, rewards: list[str], samplers: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rws = [rw for rw in rewards if any((rw, s) in groups for s in samplers)]
    if not rws:
        return
    fig, axes = plt.subplots(len(rws), 4, figsize=(17, 3.6 * len(rws)), squeeze=False)
    for i, rw in enumerate(rws):
        other = "digit" if rw == "digit_clean_trained" else "digit_clean_trained"
        for s in samplers:
            runs = groups.get((rw, s))
            if not runs:
                continue
            for ax, key in zip(axes[i], ("own", "eval", "eval_other", "div")):
                ep, m, h = curve(runs, key)
                ax.plot(ep, m, "o-", ms=3, color=COLORS[s], label=f"{LABEL[s]}, {len(runs)} seeds")
                ax.fill_between(ep, m - h, m + h, color=COLORS[s], alpha=0.2)
        for ax, t in zip(
            axes[i],
            (
                f"trained on {rw}: own rollouts' reward",
                f"ODE eval {rw} (trained on)",
                f"ODE eval {other} (other)",
                "ODE eval diversity",
            ),
        ):
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.suptitle(f"{title}: seed mean with 95% t-interval bands", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweeps(sweep: list[dict], etas: list[dict], target: float, matched: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for s in COLORS:
        pts = sorted((r["clip_range"], r["mean_clipfrac"]) for r in sweep if r["sampler"] == s)
        if pts:
            axes[0].plot(
                *zip(*pts),
                "o-",
                color=COLORS[s],
                label=f"{LABEL[s]} (matched clip {matched[s][0]:g})" if s in matched else LABEL[s],
            )
    axes[0].axhline(target, color="k", ls=":", label=f"target clipfrac {target:g}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("clip range")
    axes[0].set_ylabel("mean train/clipfrac")
    axes[0].set_title("trust-region sweep (seed 0, digit_clean_trained)", fontsize=10)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    if etas:
        by: dict = {}
        for r in etas:
            by.setdefault(r["eta"], []).append(r)
        x = sorted(by)
        for key, lab, st in (
            ("own_last3", "own-sampler reward (last 3)", "o-"),
            ("eval_final", "ODE eval", "s-"),
        ):
            mh = [ci([r[key] for r in by[e]]) for e in x]
            axes[1].errorbar(
                x,
                [m for m, _ in mh],
                yerr=[h if np.isfinite(h) else 0 for _, h in mh],
                fmt=st,
                capsize=3,
                label=lab,
            )
        axes[1].set_xlabel("CPS η")
        axes[1].set_title(
            f"CPS η sweep on digit_clean_trained ({min(len(v) for v in by.values())}+ seeds, 95% CI)",
            fontsize=10,
        )
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(
    specs: list[dict], args, metrics_dir: Path, out_dir: Path, tag: str, matched: dict, cps_eta: float
) -> str:
    """``matched``: each sampler's (matched clip range, how it was found); ``cps_eta``: CPS's η in the main
    phase (its runs join the η sweep's table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = [d for d in (load(sp, metrics_dir) for sp in specs) if d is not None]
    sweep = [r for r in data if r["phase"] == "sweep"]
    lines = [
        f"# {tag}: {len(data)} of {len(specs)} planned runs finished",
        "",
        f"Trust-region sweep (target mean clipfrac {args.target_clipfrac:g}):",
        "",
        "| sampler | clip range | mean clipfrac | wall s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['sampler']} | {r['clip_range']:g} | {r['mean_clipfrac']:.3f} | {r['wall_s']:.0f} |"
        for r in sweep
    ]
    lines += ["", "Matched clip ranges: " + ", ".join(f"{s} {c:g} ({n})" for s, (c, n) in matched.items())]
    groups_all = {}
    for phase, title in (
        ("main", "matched trust region"),
        ("paper", "the paper's clip ranges (1e-4 paper form, 2e-3 Gaussian)"),
    ):
        groups = arms(data, phase)
        groups_all[phase] = groups
        if not groups:
            continue
        lines += ["", f"## {phase}: {title}", ""] + arm_table(groups, args.rewards, args.samplers)
        lines += ["", "Paired by seed:", ""] + paired_table(groups, args.rewards)
        plot_curves(
            groups,
            args.rewards,
            args.samplers,
            out_dir / f"{tag}{'' if phase == 'main' else '_paper_clip'}.png",
            f"Digits GRPO, {title}",
        )
    etas = [r for r in data if r["phase"] == "eta" and "eval_final" in r]
    etas += [
        r
        for r in groups_all.get("main", {}).get(("digit_clean_trained", "cps"), [])
        if r["seed"] in args.seeds[: args.eta_seeds] and r["eta"] == cps_eta
    ]
    if etas:
        lines += [
            "",
            "## CPS η sweep (digit_clean_trained, matched CPS clip)",
            "",
            "| η | seeds | own reward (last 3) | ODE eval | eval diversity | mean clipfrac | largest own "
            "drop | "
            "lowest diversity / base |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in sorted({r["eta"] for r in etas}):
            rs = [r for r in etas if r["eta"] == e]
            lines.append(
                f"| {e:g} | {len(rs)} | {fmt(ci([r['own_last3'] for r in rs]))} | "
                f"{fmt(ci([r['eval_final'] for r in rs]))} | {fmt(ci([r['div_final'] for r in rs]))} | "
                f"{np.mean([r['mean_clipfrac'] for r in rs]):.3f} | "
                f"{np.mean([r['max_own_drop'] for r in rs]):.3f} | "
                f"{np.mean([r['min_div_ratio'] for r in rs]):.3f} |"
            )
    if sweep or etas:
        plot_sweeps(sweep, etas, args.target_clipfrac, matched, out_dir / f"{tag}_sweeps.png")
    done = {r["run"] for r in data}
    left = [sp["run"] for sp in specs if sp["run"] not in done]
    lines += ["", f"Runs not finished ({len(left)}): " + (", ".join(left) if left else "none")]
    walls = [r["wall_s"] for r in data]
    if walls:
        lines.append(
            f"Wall time of the finished runs: {sum(walls):.0f} s in all (runs in parallel overlap), "
            f"mean {np.mean(walls):.0f} s per run."
        )
    text = "\n".join(lines)
    print(text)
    (metrics_dir.parent / f"{tag}.md").write_text(text + "\n")
    with open(metrics_dir.parent / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in data:
            w.writerow(
                {k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in CSV_COLUMNS}
                | {
                    "own_last3": f"{r['own_last3']:.4f}",
                    "eval_train_reward": f"{r.get('eval_final', float('nan')):.4f}",
                    "eval_other_reward": f"{r.get('eval_other_final', float('nan')):.4f}",
                    "eval_diversity": f"{r.get('div_final', float('nan')):.4f}",
                    "base_eval_train_reward": f"{r['eval'].get(0, float('nan')):.4f}",
                    "base_diversity": f"{r['div'].get(0, float('nan')):.4f}",
                    "clip_range": f"{r['clip_range']:g}",
                }
            )
    print(
        f"wrote {metrics_dir.parent / (tag + '.md')}, {metrics_dir.parent / (tag + '.csv')}, figures in "
        f"{out_dir}"
    )
    return text
