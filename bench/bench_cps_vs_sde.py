"""CPS vs Flow-SDE vs Dance-SDE where the paper says it matters (issue 19).

    nice -n 10 python bench/bench_cps_vs_sde.py            # full study, resumable
    nice -n 10 python bench/bench_cps_vs_sde.py --quick    # 2 seeds, small: every phase, 193 s here
    python bench/bench_cps_vs_sde.py --summary-only        # tables and figures from what has finished

Every run is ``configs/digits_cps.json`` (toy policy, 8 steps, 8 prompts × 8 images per epoch, lr 3e-4)
trained on one reward, with the other toy reward in the config at weight 0: it does not enter the
advantages but is logged for the rollouts (``reward/<name>/mean``) and the ODE eval (``eval/<name>``).
The rewards: ``digit_clean_trained`` (classifier trained on clean images: penalises residual noise, like
PickScore/HPSv2) and ``digit`` (classifier trained with pixel-noise augmentation). Phases, in the order
given by ``--phases``:

- ``sweep``: the trust-region sweep: each sampler (CPS η 0.8 with the paper's log-prob, Flow-SDE η 0.7
  and Dance-SDE η 0.3 with the Gaussian one) at a few clip ranges, seed 0, ``--sweep-epochs`` epochs,
  ``digit_clean_trained``, no eval. Each sampler's *matched* clip range is the one whose mean
  ``train/clipfrac`` equals ``--target-clipfrac`` (log-linear interpolation between the sweep points).
- ``main``: the three samplers at their matched clip ranges, both rewards, ``--seeds``; run in the order
  CPS and Flow-SDE on ``digit_clean_trained`` seed by seed, the same on ``digit``, then Dance-SDE, so that
  an unfinished study has the paired CPS − Flow-SDE comparison first.
- ``paper``: the same at the paper-form / Gaussian-form clip ranges of the first study (1e-4 / 2e-3),
  the first ``--paper-seeds`` seeds (a second row, beside the matched one).
- ``eta``: CPS at η ``--etas`` (matched clip of CPS, ``digit_clean_trained``, the first 3 seeds;
  η 0.8 is the ``main`` run).

Runs go to ``--jobs`` worker processes (default 2), each running its runs one after another inside one
Python process (``fastcps.train.main``: the ~20 s of imports paid once; the metrics are bitwise the
same as a fresh process's). A worker claims a run by creating ``<run>.claim`` next to its metrics; a
run whose metrics file ``<metrics-dir>/<run>.jsonl`` exists is skipped, so an interrupted study is
finished by running the same command again. The report (tables, CSV, figures) is
``bench/cps_vs_sde_report.py``, called at the end.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_ETA, DEFAULT_FORM, REPO, RESULTS, study_overrides  # noqa: E402

PAPER_CLIP = {"paper": 1e-4, "gaussian": 2e-3}
SWEEP_CLIPS = {"paper": (5e-5, 1e-4, 2e-4, 4e-4, 8e-4), "gaussian": (5e-4, 1e-3, 2e-3, 4e-3)}
REWARDS = ("digit_clean_trained", "digit")
NEW_REWARD = "digit_clean_trained"


def other_reward(reward: str) -> str:
    return REWARDS[1] if reward == REWARDS[0] else REWARDS[0]


def spec(
    phase: str,
    sampler: str,
    reward: str,
    clip: float,
    seed: int,
    epochs: int,
    eval_every: int,
    eta: float | None = None,
) -> dict:
    eta = DEFAULT_ETA[sampler] if eta is None else eta
    form = DEFAULT_FORM[sampler]
    name = f"{phase}_{reward}_{sampler}_eta{eta:g}_{form}_clip{clip:.2g}_s{seed}"
    return {
        "phase": phase,
        "run": name,
        "sampler": sampler,
        "eta": eta,
        "logprob": form,
        "clip_range": clip,
        "seed": seed,
        "reward": reward,
        "epochs": epochs,
        "eval_every": eval_every,
    }


def sweep_specs(args) -> list[dict]:
    return [
        spec("sweep", s, NEW_REWARD, c, args.seeds[0], args.sweep_epochs, 0)
        for s in args.samplers
        for c in args.sweep_clips[DEFAULT_FORM[s]]
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_clipfrac(path: Path) -> float:
    vals = [m["train/clipfrac"] for m in read_jsonl(path) if "train/clipfrac" in m]
    return sum(vals) / len(vals) if vals else float("nan")


def matched_clip(points: list[tuple[float, float]], target: float) -> tuple[float, str]:
    """The clip range whose mean clipfrac is ``target``, log-linear between the two sweep points that
    bracket it (clipfrac falls as the clip range grows); outside the sweep: extrapolated from the two
    nearest points, at most 2× beyond the sweep. Rounded to 2 significant digits (run names use it)."""
    pts = sorted(points)
    note = "interpolated"
    pair = None
    for (c0, f0), (c1, f1) in zip(pts, pts[1:]):
        if min(f0, f1) <= target <= max(f0, f1) and f0 != f1:
            pair = (c0, f0, c1, f1)
            break
    if pair is None:
        note = "extrapolated"
        (c0, f0), (c1, f1) = (pts[0], pts[1]) if target > pts[0][1] else (pts[-2], pts[-1])
        pair = (c0, f0, c1, f1)
    c0, f0, c1, f1 = pair
    if f0 == f1:
        return c0, "flat"
    t = (target - f0) / (f1 - f0)
    c = math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    c = min(max(c, pts[0][0] / 2), pts[-1][0] * 2)
    return float(f"{c:.2g}"), note


def matched_clips(args, metrics_dir: Path) -> dict[str, tuple[float, str]] | None:
    out = {}
    for s in args.samplers:
        pts = []
        for sp in sweep_specs(args):
            p = metrics_dir / f"{sp['run']}.jsonl"
            if sp["sampler"] == s and p.exists():
                pts.append((sp["clip_range"], mean_clipfrac(p)))
        if len(pts) < 2:
            return None
        out[s] = matched_clip(pts, args.target_clipfrac)
    return out


def plan(args, metrics_dir: Path) -> list[dict]:
    specs: list[dict] = []
    matched = None
    for phase in args.phases:
        if phase == "sweep":
            specs += sweep_specs(args)
            continue
        if phase in ("main", "eta"):
            matched = matched or matched_clips(args, metrics_dir)
            if matched is None:
                print(f"[bench] phase {phase}: the sweep has not finished; run phase sweep first", flush=True)
                continue
        if phase == "main":  # first the paired CPS vs Flow-SDE runs, reward by reward, then Dance-SDE
            main = [
                spec("main", s, r, matched[s][0], seed, args.epochs, args.eval_every)
                for r in args.rewards
                for seed in args.seeds
                for s in args.samplers
            ]
            specs += sorted(main, key=lambda sp: sp["sampler"] == "dance_sde")
        elif phase == "paper":
            specs += [
                spec("paper", s, r, PAPER_CLIP[DEFAULT_FORM[s]], seed, args.epochs, args.eval_every)
                for seed in args.seeds[: args.paper_seeds]
                for r in args.rewards
                for s in args.samplers
            ]
        elif phase == "eta" and "cps" in matched:
            specs += [
                spec("eta", "cps", NEW_REWARD, matched["cps"][0], seed, args.epochs, args.eval_every, eta)
                for seed in args.seeds[: args.eta_seeds]
                for eta in args.etas
                if not math.isclose(eta, DEFAULT_ETA["cps"])
            ]
    return specs


def write_config(args, reward: str, root: Path) -> Path:
    cfg = json.loads((REPO / args.config).read_text())
    cfg["rewards"] = [{"name": reward, "weight": 1.0}, {"name": other_reward(reward), "weight": 0.0}]
    path = root / "configs" / f"{reward}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def train_argv(sp: dict, args, run_root: Path) -> list[str]:
    config = ["--config", str(write_config(args, sp["reward"], run_root))]
    return config + study_overrides(sp, run_root, sp["epochs"], sp["eval_every"], args.set)


def claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def worker(args) -> int:
    """Runs the specs of ``--worker FILE`` in this process, skipping finished and claimed ones."""
    import torch

    torch.set_num_threads(args.threads)
    from fastcps.train import main as train_main

    specs = json.loads(Path(args.worker).read_text())
    run_root, metrics_dir = Path(args.runs_dir), Path(args.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for sp in specs:
        dest = metrics_dir / f"{sp['run']}.jsonl"
        if dest.exists() or not claim(metrics_dir / f"{sp['run']}.claim"):
            continue
        if args.deadline and time.time() > args.deadline:
            (metrics_dir / f"{sp['run']}.claim").unlink(missing_ok=True)
            print(f"[worker {os.getpid()}] deadline passed: stopping before {sp['run']}", flush=True)
            break
        t0 = time.perf_counter()
        print(f"[worker {os.getpid()}] {sp['run']} ...", flush=True)
        rc = train_main(train_argv(sp, args, run_root))
        wall = time.perf_counter() - t0
        run_dir = run_root / sp["run"]
        if rc != 0:
            print(f"[worker {os.getpid()}] {sp['run']} failed with exit code {rc}", flush=True)
            return rc
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        last = max((json.loads(x).get("epoch", -1) for x in lines if x.strip()), default=-1)
        if last != sp["epochs"]:  # a stop (SIGTERM/SIGINT) ends a run early with exit code 0: not a result
            (metrics_dir / f"{sp['run']}.claim").unlink(missing_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            print(
                f"[worker {os.getpid()}] {sp['run']} stopped at epoch {last} of {sp['epochs']}: not "
                "recorded; "
                "stopping",
                flush=True,
            )
            return 5
        lines.append(json.dumps({"bench/wall_s": wall, "bench/spec": sp}))
        tmp = dest.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(dest)
        (metrics_dir / f"{sp['run']}.claim").unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[worker {os.getpid()}] {sp['run']} done in {wall:.0f} s", flush=True)
    return 0


def run_all(specs: list[dict], args) -> None:
    metrics_dir = Path(args.metrics_dir)
    todo = [s for s in specs if not (metrics_dir / f"{s['run']}.jsonl").exists()]
    print(
        f"[bench] {len(specs)} runs planned, {len(specs) - len(todo)} finished before, {len(todo)} to run",
        flush=True,
    )
    if not todo:
        return
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for c in metrics_dir.glob("*.claim"):  # claims of an interrupted study: its workers are gone
        c.unlink()
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    queue = Path(args.runs_dir) / f"queue_{os.getpid()}.json"
    queue.write_text(json.dumps(todo))
    env = dict(
        os.environ,
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
    )
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(queue),
        "--runs-dir",
        args.runs_dir,
        "--metrics-dir",
        args.metrics_dir,
        "--threads",
        str(args.threads),
        "--config",
        args.config,
        "--deadline",
        str(args.deadline or 0),
    ] + [x for kv in args.set for x in ("--set", kv)]
    logs = [open(Path(args.runs_dir) / f"worker{k}.log", "a") for k in range(args.jobs)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT) for f in logs]
    rcs = [p.wait() for p in procs]
    for f in logs:
        f.close()
    if any(rcs):
        raise SystemExit(f"[bench] a worker failed (exit codes {rcs}); see {args.runs_dir}/worker*.log")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, 3 epochs, 4 prompts × 8 images, small eval; "
        "everything under runs/bench_cps_vs_sde_quick/",
    )
    ap.add_argument("--config", default="configs/digits_cps.json")
    ap.add_argument("--phases", default="sweep,main,eta,paper")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--samplers", default="cps,flow_sde,dance_sde")
    ap.add_argument("--rewards", default=",".join(REWARDS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--sweep-epochs", type=int, default=6)
    ap.add_argument("--target-clipfrac", type=float, default=0.2)
    ap.add_argument("--etas", default="0.2,0.4,0.6,0.8,1.0")
    ap.add_argument("--eta-seeds", type=int, default=3)
    ap.add_argument(
        "--paper-seeds", type=int, default=3, help="seeds of the paper-settings row (a second row)"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer override")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="unix time after which workers start no new run (the running one finishes)",
    )
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--metrics-dir", default=None)
    ap.add_argument(
        "--out-dir", default=None, help="figures (default docs/figures; --quick: the metrics dir)"
    )
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tag = "cps_vs_sde_quick" if args.quick else "cps_vs_sde"
    args.runs_dir = args.runs_dir or str(REPO / "runs" / f"bench_{tag}")
    # the quick smoke run keeps everything under runs/ (git-ignored); the study under bench/results
    args.metrics_dir = args.metrics_dir or str(
        (REPO / "runs" / f"bench_{tag}" / "results" if args.quick else RESULTS) / tag
    )
    if args.worker:
        raise SystemExit(worker(args))
    if args.quick:
        args.seeds, args.epochs, args.eval_every, args.sweep_epochs = "0,1", 3, 3, 2
        args.etas, args.eta_seeds, args.paper_seeds = "0.4,1.0", 2, 2
        # 32 rollouts in 2 minibatches of 16: the second minibatch's ratio moves, so clipfrac is measured
        args.set = [
            "train.prompts_per_epoch=4",
            "train.rollout_batch_size=16",
            "train.minibatch_size=16",
            "eval.num_prompts=5",
            "eval.images_per_prompt=4",
            *args.set,
        ]
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    args.samplers = [x for x in args.samplers.split(",") if x]
    args.rewards = [x for x in args.rewards.split(",") if x]
    args.phases = [x for x in args.phases.split(",") if x]
    args.etas = [float(x) for x in args.etas.split(",") if x]
    args.sweep_clips = {k: v[1:3] if args.quick else v for k, v in SWEEP_CLIPS.items()}
    out_dir = (
        Path(args.out_dir)
        if args.out_dir
        else (Path(args.metrics_dir) if args.quick else REPO / "docs" / "figures")
    )
    t0 = time.perf_counter()
    if not args.summary_only:
        if "sweep" in args.phases:  # the matched clip ranges depend on it: first, on its own
            run_all(
                plan(argparse.Namespace(**{**vars(args), "phases": ["sweep"]}), Path(args.metrics_dir)), args
            )
        rest = [p for p in args.phases if p != "sweep"]
        run_all(plan(argparse.Namespace(**{**vars(args), "phases": rest}), Path(args.metrics_dir)), args)
    print(f"[bench] runs took {time.perf_counter() - t0:.0f} s wall", flush=True)
    from cps_vs_sde_report import report

    all_specs = plan(args, Path(args.metrics_dir))
    metrics_dir = Path(args.metrics_dir)
    report(
        all_specs, args, metrics_dir, out_dir, tag, matched_clips(args, metrics_dir) or {}, DEFAULT_ETA["cps"]
    )
    print(f"[bench] total {time.perf_counter() - t0:.0f} s wall", flush=True)


if __name__ == "__main__":
    main()
