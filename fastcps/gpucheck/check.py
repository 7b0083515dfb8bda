"""One command that measures a GPU machine: ``python -m fastcps.gpucheck`` (from a fastcps checkout).

Parts, each in a process of its own (a part that fails or runs out of memory leaves the others their
figures), about 7-10 minutes on one H100:

- ``tests``: the gpu-marked tests (``pytest -m gpu``): the Triton kernels compiled for the device against
  the fp32 reference in every dtype and tiling (the multi-iteration ones too), the toy trainer on CUDA;
- ``kernels``: ``bench/bench_cps_step.py`` and ``bench/bench_cps_logprob_kl.py`` at B ∈ {1, 4, 16} × 4096 ×
64,
  fp32 and bf16: the fused op against the naive op-by-op sequence and torch.compile of the reference;
  medians with p20/p80, GB/s and % of the measured copy bandwidth (their own CSVs);
- ``toy``: the digits run on CUDA through the Triton path (fp32 and bf16): ``train/ratio_dev`` with old
  log-probs from the rollout, and the rollout-vs-training log-prob agreement on the same samples;
- ``flux``: one GRPO epoch of the real-size FLUX.1-dev architecture (configs/models, random weights),
  LoRA r 64, 512 px, bf16, one process at the settings ``auto`` takes for this GPU (ZeRO stage,
  checkpointing, micro-batch: ``fastcps.plan.choose``), tiny text encoders of the real widths, a tiny
  VAE: images/s, the epoch split, the run's peak memory (reserved and allocated) beside the plan's.

Every figure becomes a row of ``<out>/gpucheck.csv`` with the device name, versions and commit
(``FASTCPS_COMMIT`` names the commit where the copy has no .git). Nothing is downloaded. Without CUDA
it says what it needs and exits 2; a failed part exits 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastcps import runinfo
from fastcps.allocator import enable_expandable_segments

REPO = Path(__file__).resolve().parents[2]
PARTS = ("tests", "kernels", "toy", "flux")
# flux: the plan measures FLUX.1-dev on fake CPU tensors first (~1 min) to take the auto settings
TIMEOUT_S = {"tests": 150, "kernels": 150, "toy": 90, "flux": 360}
COLUMNS = [
    "timestamp",
    "device",
    "torch",
    "triton",
    "fastcps",
    "commit",
    "part",
    "metric",
    "value",
    "unit",
    "note",
]
NEEDED = ("diffusers", "transformers", "peft", "deepspeed", "triton", "pytest")


def missing_requirements() -> list[str]:
    """What stops a GPU check here, as sentences (empty when it can run)."""
    why = []
    if not torch.cuda.is_available():
        why.append(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'})"
        )
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        why.append(
            "TRITON_INTERPRET is set: the kernels would run in Triton's interpreter, not on the GPU; unset it"
        )
    absent = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if absent:
        why.append(
            f"missing packages: {', '.join(absent)} (pip install -e '.[dev]'; on a machine without network, "
            "carry them as wheels)"
        )
    if not (REPO / "tests").is_dir() or not (REPO / "bench").is_dir():
        why.append(f"run it from a fastcps checkout: {REPO} has no tests/ or bench/")
    return why


# --- the parts (each runs in a child process: ``--part NAME``) --------------------------------------------


def part_tests() -> list[dict]:
    from fastcps.gpucheck.runs import row

    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", res.stdout)}
    print(res.stdout[-3000:], file=sys.stderr)
    rows = [row("tests", k, counts.get(k, 0), "tests") for k in ("passed", "failed", "skipped", "error")]
    rows.append(
        row("tests", "wall_s", round(time.perf_counter() - t0, 1), "s", f"pytest exit code {res.returncode}")
    )
    if res.returncode != 0:
        raise PartFailed(rows, f"pytest -m gpu exited {res.returncode}")
    return rows


def _bench(name: str):
    """A benchmark script of bench/ as a module, loaded from its file (bench/ is no package: its scripts
    find their shared ``common`` next to themselves)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def part_kernels(out: Path) -> list[dict]:
    from fastcps.gpucheck.runs import row

    rows = []
    for mod in (_bench("bench_cps_step"), _bench("bench_cps_logprob_kl")):
        got = mod.main(
            [
                "--sizes",
                "1,4,16",
                "--dtypes",
                "fp32,bf16",
                "--impls",
                "fused,naive,compiled_ref",
                "--csv",
                str(out / f"{mod.OP}.csv"),
            ]
        )
        for r in got:
            if r["impl"] != "fused":
                continue
            cell = f"{r['op']}/{r['direction']}/{r['dtype']}/{r['shape']}"
            rows.append(
                row(
                    "kernels",
                    f"{cell}/median_ms",
                    r["median_ms"],
                    "ms",
                    f"p20 {r['p20_ms']}, p80 {r['p80_ms']}",
                )
            )
            rows.append(
                row("kernels", f"{cell}/GB_s", r["GB/s"], "GB/s", f"{r['%copy_bw']} % of copy bandwidth")
            )
            rows.append(row("kernels", f"{cell}/speedup_vs_naive", r["speedup_vs_naive"], "x"))
            compiled = next(
                (
                    c
                    for c in got
                    if c["impl"] == "compiled_ref"
                    and c["direction"] == r["direction"]
                    and c["dtype"] == r["dtype"]
                    and c["shape"] == r["shape"]
                ),
                None,
            )
            if compiled:
                rows.append(
                    row(
                        "kernels",
                        f"{cell}/speedup_vs_compiled",
                        round(float(compiled["median_ms"]) / float(r["median_ms"]), 2),
                        "x",
                        "torch.compile of the reference",
                    )
                )
    return rows


def part_toy() -> list[dict]:
    from fastcps.gpucheck.runs import toy_run

    return toy_run(torch.device("cuda", 0))


def part_flux() -> list[dict]:
    from fastcps.gpucheck.runs import flux_epoch

    return flux_epoch(torch.device("cuda", 0))


class PartFailed(RuntimeError):
    def __init__(self, rows, why):
        super().__init__(why)
        self.rows = rows


def run_part(name: str, out: Path) -> int:
    """In the child: run one part, print its rows as one JSON line last."""
    fns = {"tests": part_tests, "kernels": lambda: part_kernels(out), "toy": part_toy, "flux": part_flux}
    try:
        rows, rc = fns[name](), 0
    except PartFailed as err:
        rows, rc = err.rows, 1
    print(json.dumps(rows, default=str))
    return rc


# --- the driver ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcps.gpucheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument(
        "--out",
        default=str(REPO / "bench" / "results"),
        help="folder of the CSVs (gpucheck.csv and the benchmarks' own)",
    )
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    args = ap.parse_args(argv)
    # before any CUDA call, here and (inherited) in every part's process: fastcps.allocator says why
    enable_expandable_segments()
    out = Path(args.out)
    if args.part:
        return run_part(args.part, out)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"gpucheck: unknown part(s) {bad} in --parts; choose from {','.join(PARTS)}", file=sys.stderr)
        return 2
    why = missing_requirements()
    if why:
        print(
            "fastcps.gpucheck measures a CUDA GPU machine and cannot run here:\n  - "
            + "\n  - ".join(why)
            + "\nOn a GPU machine, from a fastcps checkout: python -m fastcps.gpucheck "
            "[--parts tests,kernels,toy,flux] [--out DIR]",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", 0)
    base = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": runinfo.device_name(device),
        **runinfo.versions(),
        "commit": runinfo.git_commit(),
    }
    print(
        f"gpucheck on {base['device']} (torch {base['torch']}, triton {base['triton']}, commit "
        f"{base['commit']})"
    )
    failed = []
    for name in parts:
        t0 = time.perf_counter()
        rows, status = _child(name, out)
        rows.append(
            {
                "part": name,
                "metric": "part_wall_s",
                "value": round(time.perf_counter() - t0, 1),
                "unit": "s",
                "note": status,
            }
        )
        runinfo.append_csv(out / "gpucheck.csv", [{**base, **r} for r in rows], COLUMNS)
        for r in rows:
            print(f"  {name:8} {r['metric']:48} {r['value']!s:>12} {r['unit']:6} {r['note']}")
        if status != "ok":
            failed.append(f"{name} ({status})")
    print(
        f"gpucheck: rows in {out / 'gpucheck.csv'}; "
        + (f"FAILED: {', '.join(failed)}" if failed else "all parts ran")
    )
    return 1 if failed else 0


def _child(name: str, out: Path) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", "fastcps.gpucheck", "--part", name, "--out", str(out)]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S[name])
    except subprocess.TimeoutExpired:
        return [], f"timed out after {TIMEOUT_S[name]} s"
    sys.stderr.write(res.stderr[-2000:])
    lines = res.stdout.strip().splitlines()
    try:
        rows = json.loads(lines[-1]) if lines else []
    except json.JSONDecodeError:
        rows = []
    status = (
        "ok"
        if res.returncode == 0
        else f"exit {res.returncode}: " + (res.stderr.strip().splitlines() or [""])[-1][:200]
    )
    return rows, status
