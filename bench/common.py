"""Shared pieces of the kernel benchmarks: timers, byte counts, run metadata, CSV rows, tables.

The op benchmarks (``bench_cps_step.py``, ``bench_cps_logprob_kl.py``) share one name with their op
(kernel, reference, test and benchmark: Liger-Kernel style) and keep only what is op-specific: the
implementations compared and the bytes each one must move.

Timing rules:
- CUDA: ``triton.testing.do_bench`` (L2 flushed between calls), quantiles 0.5 / 0.2 / 0.8.
- CPU: ``time.perf_counter`` around single calls, the variants interleaved round-robin (one call of
  each per round, rotating the order) so that load from other processes hits every variant alike;
  median / p20 / p80 over the rounds. Warm-up calls (which include torch.compile's compilation) are
  never timed.
- The reference bandwidth is a ``dst.copy_(src)`` moving the same byte count as the op (read + write),
  timed inside the same interleaved set, so %copy_bw compares like with like on a loaded machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fastcps import runinfo
from fastcps.runinfo import device_name, git_commit, versions  # noqa: F401  (the benchmarks' names for them)
from fastcps.runtime import DTYPES, GIB

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

COLUMNS = [
    "timestamp",
    "device",
    "threads",
    "timer",
    "malloc",
    "torch",
    "triton",
    "fastcps",
    "commit",
    "op",
    "direction",
    "impl",
    "dtype",
    "shape",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "bytes",
    "GB/s",
    "%copy_bw",
    "copy_GB/s",
    "peak_mem_gib",
    "speedup_vs_naive",
    "note",
]
PTX_COLUMNS = [
    "timestamp",
    "device",
    "torch",
    "triton",
    "fastcps",
    "commit",
    "kernel",
    "num_warps",
    "BLOCK",
    "ITERS",
    "ptxas",
    "registers",
    "spill_bytes",
    "stack_bytes",
    "cubin_local_bytes",
    "ptx_ld_v4",
    "ptx_ld_narrow",
    "ptx_ld_scalar_coeffs",
    "ptx_st_v4",
    "ptx_st_narrow",
    "sass_ldg128",
    "sass_ldg_other",
    "sass_stg128",
    "sass_stg_other",
    "loads_128bit",
]
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# FLUX.1 at 1024²: 64×64 packed tokens of 2×2×16 = 64 channels.
TOKENS, CHANNELS = 4096, 64


# ---------------------------------------------------------------- run metadata


# The GRPO sampler studies (bench_samplers_grpo.py, bench_cps_vs_sde.py): each sampler at its paper η,
# with the log-prob form its authors train with, and its name in tables and legends.
DEFAULT_ETA = {"cps": 0.8, "flow_sde": 0.7, "dance_sde": 0.3}
DEFAULT_FORM = {"cps": "paper", "flow_sde": "gaussian", "dance_sde": "gaussian"}
LABEL = {"cps": "CPS (η 0.8)", "flow_sde": "Flow-SDE (η 0.7)", "dance_sde": "Dance-SDE (η 0.3)"}


def study_overrides(spec: dict, run_root: Path, epochs: int, eval_every: int, extra: list[str]) -> list[str]:
    """A study run's ``--set`` arguments for ``fastcps.train``: its sampler, η, log-prob form, clip range
    and seed, quiet logging and no checkpoints, then the study's own ``KEY=VALUE`` overrides."""
    sets = {
        "name": spec["run"],
        "output_dir": str(run_root),
        "seed": spec["seed"],
        "sampler.name": spec["sampler"],
        "sampler.eta": spec["eta"],
        "sampler.logprob": spec["logprob"],
        "train.clip_range": spec["clip_range"],
        "train.num_epochs": epochs,
        "eval.every": eval_every,
        "log.tensorboard": "false",
        "log.images_every": 0,
        "log.progress": "false",
        "checkpoint.every": 0,
    }
    sets.update(dict(kv.split("=", 1) for kv in extra))
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def read_run_metrics(path: Path | str, keys: dict[str, str]) -> dict:
    """A study's run file (the trainer's metrics.jsonl plus the study's last line ``{"bench/wall_s": s,
    ...}``) as ``{name: {epoch: value}}`` for each ``name -> metric key`` of ``keys``, and ``"wall_s"``."""
    out: dict = {name: {} for name in keys}
    out["wall_s"] = float("nan")
    for line in Path(path).read_text().splitlines():
        m = json.loads(line) if line.strip() else {}
        if "bench/wall_s" in m:
            out["wall_s"] = m["bench/wall_s"]
        for name, key in keys.items():
            if key in m:
                out[name][m.get("epoch")] = m[key]
    return out


def meta(device: torch.device, timer: str = "wall") -> dict:
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "timer": f"cpu:{timer}" if device.type == "cpu" else "cuda:do_bench",
        "malloc": _MALLOC if device.type == "cpu" else "",
        **versions(),
        "commit": git_commit(),
    }


_MALLOC = "glibc default"


def malloc_keep() -> None:
    """Stop glibc from handing freed multi-MB blocks back to the OS (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD = 1 GiB). With its defaults every fresh 4 MiB temporary is mmapped or regrown and
    first-touch page-faulted (~1,000 faults per call for the fused step at 4×4096×64 fp32, ~9,000 for
    the naive sequence), which is most of what a call costs on CPU."""
    global _MALLOC
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    if not ok:
        raise RuntimeError("mallopt failed: --malloc-keep needs glibc")
    _MALLOC = "keep (mallopt mmap/trim threshold 1 GiB)"


# ---------------------------------------------------------------- timing


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    s = sorted(samples_ms)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(s), q[1], q[7]


def time_cpu(
    fns: dict, repeats: int, warmup: int, clock=time.perf_counter
) -> dict[str, tuple[float, float, float]]:
    """(median, p20, p80) in ms per named callable, interleaved round-robin, order rotated each round.

    ``clock``: ``time.perf_counter`` (wall time, the default) or ``time.process_time`` (CPU time of every
    thread of this process: on a shared machine it leaves out the time other processes held the core,
    but it also counts OpenMP workers spinning, so use it with --threads 1)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            fns[n]()
            samples[n].append((clock() - t0) * 1e3)
    return {n: _quantiles(samples[n]) for n in names}


def time_cuda(fns: dict, repeats: int, warmup: int) -> dict[str, tuple[float, float, float]]:
    """triton.testing.do_bench per callable (its own warm-up and L2 flush); ``repeats`` is its rep in ms."""
    from triton.testing import do_bench

    out = {}
    for n, fn in fns.items():
        fn()  # compile / autotune outside the timed region
        med, p20, p80 = do_bench(fn, warmup=max(warmup, 25), rep=max(repeats, 100), quantiles=[0.5, 0.2, 0.8])
        out[n] = (med, p20, p80)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_all(fns: dict, device: torch.device, repeats: int, warmup: int, timer: str = "wall"):
    if device.type == "cuda":
        return time_cuda(fns, repeats, warmup)
    return time_cpu(fns, repeats, warmup, CLOCKS[timer])


def copy_fn(nbytes: int, device: torch.device):
    """A ``dst.copy_(src)`` that moves ``nbytes`` in all (nbytes/2 read, nbytes/2 written)."""
    n = max(1, nbytes // 8)  # fp32 elements per side
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def peak_mem_gib(fn, device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated over one call (inputs included); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


# ---------------------------------------------------------------- rows, CSV, tables


def result_rows(
    base: dict, timings: dict, nbytes: dict, peaks: dict, notes: dict | None = None
) -> list[dict]:
    """Rows for one (op, direction, dtype, shape): one per impl, GB/s against each impl's byte count,
    %copy_bw against the interleaved copy of the same bytes, speedup against ``naive``."""
    notes = notes or {}
    naive = timings.get("naive")
    rows = []
    for impl, (med, p20, p80) in timings.items():
        if impl.startswith("copy:"):
            continue
        nb = nbytes[impl]
        copy_med = timings[f"copy:{impl}"][0]
        gbs = nb / (med * 1e-3) / 1e9
        copy_gbs = nb / (copy_med * 1e-3) / 1e9
        peak = peaks.get(impl)
        rows.append(
            {
                **base,
                "impl": impl,
                "median_ms": f"{med:.4f}",
                "p20_ms": f"{p20:.4f}",
                "p80_ms": f"{p80:.4f}",
                "bytes": nb,
                "GB/s": f"{gbs:.2f}",
                "%copy_bw": f"{100 * gbs / copy_gbs:.1f}",
                "copy_GB/s": f"{copy_gbs:.2f}",
                "peak_mem_gib": "" if peak is None else f"{peak:.3f}",
                "speedup_vs_naive": "" if naive is None else f"{naive[0] / med:.2f}",
                "note": notes.get(impl, ""),
            }
        )
    return rows


def append_csv(path: Path | str, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    return runinfo.append_csv(path, rows, columns)


def print_table(rows: list[dict], cols: list[str]) -> None:
    if not rows:
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(f"{c:<{widths[c]}}" for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, '')!s:<{widths[c]}}" for c in cols))


TABLE_COLS = [
    "direction",
    "impl",
    "dtype",
    "shape",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "GB/s",
    "%copy_bw",
    "peak_mem_gib",
    "speedup_vs_naive",
]


# ---------------------------------------------------------------- PTX report


@functools.lru_cache(maxsize=1)
def load_ptx_report():
    """bench/ptx_report.py as one module object per process (it is a script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fastcps_bench_ptx_report", Path(__file__).parent / "ptx_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=1)
def _ptx_outcome() -> tuple:
    try:
        return tuple(load_ptx_report().ptx_report()), None
    except Exception as exc:  # remembered, so a second caller does not recompile 60 variants to fail again
        return None, exc


def ptx_rows() -> tuple:
    """All 60 variants compiled once per process (~40-50 s of CPU, most of it cuobjdump's SASS dumps),
    shared by both benches and tests/test_ptx_report.py; a failure is raised again to every caller."""
    rows, exc = _ptx_outcome()
    if exc is not None:
        raise exc
    return rows


def ptx_toolchain_missing() -> str | None:
    """Why the sm_90 report cannot run here, or None."""
    mod = load_ptx_report()
    try:
        mod.toolchain()
    except mod.ToolchainMissing as exc:
        return str(exc)
    return None


def run_ptx(prefixes: tuple[str, ...], csv_path: Path | str) -> list[dict]:
    """sm_90 compile report (bench/ptx_report.py) for kernels whose name starts with ``prefixes``;
    prints the table and appends the rows. Raises ptx_report.ToolchainMissing without the toolchain."""
    rows = [r for r in ptx_rows() if r["kernel"].startswith(prefixes)]
    m = meta(torch.device("cpu"))
    m["device"] = "sm_90a (compile only; the cubin Triton built, read with cuobjdump)"
    out = [{**m, **r} for r in rows]
    print_table(
        out,
        [
            "kernel",
            "num_warps",
            "BLOCK",
            "ITERS",
            "registers",
            "spill_bytes",
            "stack_bytes",
            "ptx_ld_v4",
            "ptx_ld_narrow",
            "sass_ldg128",
            "sass_stg128",
            "loads_128bit",
        ],
    )
    append_csv(csv_path, out, PTX_COLUMNS)
    return out


def run_and_report(
    op: str, args, device: torch.device, shapes, dtypes, bench_cells, ptx_prefixes
) -> list[dict]:
    """The shared body of an op benchmark's main(): time every (dtype, shape) cell unless
    ``--ptx-only`` (``bench_cells(shape, dtype)`` returns its rows; a fresh compile cache per shape),
    print and append the table, then the sm_90 report with ``--ptx``/``--ptx-only``."""
    rows = []
    if not args.ptx_only:
        for dtype in dtypes:
            for shape in shapes:
                fresh_compile_cache(device)
                rows += bench_cells(shape, dtype)
        print(
            f"\n{op} on {device_name(device)}, threads={torch.get_num_threads()}, "
            f"timer={args.timer}, commit {git_commit()} -> {args.csv}"
        )
        print_table(rows, TABLE_COLS)
        append_csv(args.csv, rows)
    if args.ptx or args.ptx_only:
        print(f"\nsm_90 compile report ({op} kernels) -> {args.ptx_csv}")
        rows += run_ptx(ptx_prefixes, args.ptx_csv)
    return rows


# ---------------------------------------------------------------- command line


def parser(op: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Benchmark {op}: fused vs naive PyTorch vs compiled reference.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated batch sizes B of (B, 4096, 64) latents, or full shapes BxTxC "
        "(default: 1,4,16 on CUDA; 1,4 on CPU)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated: fp32,bf16,fp16 (default: bf16,fp32 on CUDA; fp32 on CPU)",
    )
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated subset of fused,naive,compiled_ref (default: all on CUDA; fused,naive on CPU)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: timed rounds (default 40); CUDA: do_bench rep in ms (default 100)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each variant first (CPU)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads on CPU (before compiling)"
    )
    p.add_argument(
        "--timer",
        choices=sorted(CLOCKS),
        default="wall",
        help="CPU clock: wall (time.perf_counter) or cpu (time.process_time; with --threads 1 "
        "it leaves out the time other processes held the core)",
    )
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="CPU: keep freed memory in the process (glibc mallopt) instead of page-faulting "
        "fresh pages for every temporary",
    )
    p.add_argument(
        "--cpu-eager",
        action="store_true",
        help="CPU fused path without torch.compile (FASTCPS_COMPILE=0): smoke tests only",
    )
    p.add_argument("--csv", default=str(RESULTS / f"{op}.csv"))
    p.add_argument("--ptx", action="store_true", help="also print/append the sm_90 compile report (no GPU)")
    p.add_argument("--ptx-only", action="store_true", help="only the sm_90 compile report, no timings")
    p.add_argument("--ptx-csv", default=str(RESULTS / "ptx.csv"))
    return p


def setup(args) -> tuple[torch.device, list[tuple[int, ...]], list[torch.dtype], list[str]]:
    """Resolve defaults per device; on CPU pin the fused path to the compiled reference."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        if args.threads:
            torch.set_num_threads(args.threads)  # before any compile: inductor bakes it into the kernels
        if args.malloc_keep:
            malloc_keep()
        os.environ["FASTCPS_IMPL"] = "torch"
        os.environ["FASTCPS_COMPILE"] = "0" if args.cpu_eager else "1"
    sizes = args.sizes or ("1,4,16" if cuda else "1,4")
    shapes = []
    for s in sizes.split(","):
        dims = tuple(int(d) for d in s.lower().split("x"))
        shapes.append(dims if len(dims) > 1 else (dims[0], TOKENS, CHANNELS))
    dtypes = [DTYPES[d.strip()] for d in (args.dtypes or ("bf16,fp32" if cuda else "fp32")).split(",")]
    impls = (args.impls or ("fused,naive,compiled_ref" if cuda else "fused,naive")).split(",")
    bad = set(impls) - {"fused", "naive", "compiled_ref"}
    if bad:
        raise SystemExit(f"--impls: unknown {sorted(bad)}; choose from fused,naive,compiled_ref")
    if args.repeats is None:
        args.repeats = 100 if cuda else 40
    return device, shapes, dtypes, impls


def fused_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton kernel"
    return (
        "cpu: reference math, eager (FASTCPS_COMPILE=0)"
        if os.environ.get("FASTCPS_COMPILE") == "0"
        else "cpu: compiled reference (inductor)"
    )


def fresh_compile_cache(device: torch.device) -> None:
    """Each shape compiles on its own (as in a run with one latent shape), not as dynamo's dynamic-shape
    recompile that a second shape would otherwise trigger."""
    torch._dynamo.reset()
