"""Compile every fused kernel for sm_90 without a GPU and report registers, spills and load widths.

Each variant (latent dtype × mode, at the heuristic tilings of (1, 4096·64) and (16, 4096·64)) is built
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; pointers, N, the row
strides and n_chunks are marked 16-divisible (``tt.divisibility``), which is what Triton's runtime
specialisation gives for real latents (N a multiple of 16, 16-byte aligned allocations). Then:

- registers and spills: ``ptxas -v --gpu-name sm_90a`` on the PTX (Triton's bundled ptxas, the one
  that built the cubin), cross-checked with ``cuobjdump -res-usage`` on the cubin (REG, LOCAL);
- load/store width: every predicated (masked, i.e. latent) ``ld.global`` in the PTX must be
  ``.v4.b32`` (16 bytes: 4 fp32 or 8 bf16/fp16), and the SASS of the cubin is scanned for
  ``LDG.E.128``/``STG.E.128``. The unpredicated loads are the per-row fp32 coefficients.

Measured with Triton 3.8.0 / ptxas 12.9, sm_90a, 60 variants (3 dtypes × {cps_step noise/seed/prev
± mean, logprob_kl fwd/bwd ± v_ref} × tilings B = 1 and B = 16 of N = 4096·64):

    tiling: 4 warps, BLOCK = 16 B/thread·32·4 = 512 fp32 / 1024 bf16|fp16 elements;
            ITERS = 1 at B = 1 (512 or 256 programs), 8 fp32 / 4 half at B = 16 (the loop runs;
            LLVM or ptxas unrolls it in most variants: up to 32 LDG.E.128 per program).
    every variant: 0 spill bytes, no local memory, every masked latent load ld.global.v4.b32 in PTX
    and LDG.E.128 in SASS, latent stores STG.E.128; registers 27-40 at B = 1, 30-56 at B = 16 (the
    most: logprob_kl_fwd[bf16|fp16,ref] and cps_step[bf16,noise,mean] with the unrolled loop).
    Occupancy: ≤ 32 regs gives all 2048 threads/SM, 40 gives 1536, 56 gives 1152; the unrolled
    variants trade that for 4-8 independent 16-byte loads in flight per thread, which is what a
    streaming kernel needs (to be confirmed by bench timings on a GPU; none was available here).

No tuning was needed beyond the 16-bytes-per-thread BLOCK rule; the first heuristic met both goals.
``python bench/ptx_report.py`` prints the per-kernel table; ``--json`` the rows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

__all__ = ["ToolchainMissing", "ptx_report", "toolchain"]

# Arguments that Triton's runtime marks 16-divisible for real latents (pointers are added by type).
_BATCHES = (1, 16)
_DIVISIBLE_INTS = {"N", "stride_x", "stride_v", "stride_noise", "stride_prev", "stride_vref", "n_chunks"}


class ToolchainMissing(RuntimeError):
    """Triton, its NVIDIA backend or its bundled ptxas/cuobjdump cannot be found."""


def toolchain() -> dict:
    """Paths of Triton's bundled NVIDIA binaries; raises ToolchainMissing naming what is absent."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        raise ToolchainMissing(f"triton (with triton.compiler.ASTSource) is not importable: {exc}") from exc
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = {name: os.path.join(bindir, name) for name in ("ptxas", "cuobjdump")}
    for name, path in tools.items():
        if not os.access(path, os.X_OK):
            raise ToolchainMissing(f"Triton's bundled {name} is missing at {path}")
    return tools


def _variants():
    from fastcps.kernels import cps_logprob_kl, cps_step

    # B = 1: one block per program (ITERS = 1, 512 programs at N = 4096·64);
    # B = 16: the chunk loop runs (ITERS = 8 fp32 / 4 half), which ptxas may unroll.
    out = []
    for batch in _BATCHES:
        out += cps_step.compile_variants(batch) + cps_logprob_kl.compile_variants(batch)
    return out


def _compile(fn, sig, consts, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {}
    for i, (k, t) in enumerate(sig.items()):
        if t.startswith("*") or k in _DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _ptxas_usage(ptxas: str, ptx: str) -> dict:
    # Triton targets sm_90a (its .target line), which ptxas must be told as --gpu-name.
    arch = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    arch = arch.group(1) if arch else "sm_90a"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
    }


def _cubin_scan(cuobjdump: str, cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    ldg = re.findall(r"\bLDG\.E(\.[A-Z0-9.]+)?", sass)
    stg = re.findall(r"\bSTG\.E(\.[A-Z0-9.]+)?", sass)
    return {
        "cubin_registers": int(reg.group(1)) if reg else None,
        "cubin_local_bytes": int(local.group(1)) if local else None,
        "sass_ldg128": sum(".128" in m for m in ldg),
        "sass_ldg_other": sum(".128" not in m for m in ldg),
        "sass_stg128": sum(".128" in m for m in stg),
        "sass_stg_other": sum(".128" not in m for m in stg),
    }


def _ptx_scan(ptx: str) -> dict:
    masked_ld = [ln for ln in ptx.splitlines() if re.search(r"@%p\d+\s+ld\.global", ln)]
    plain_ld = [ln for ln in ptx.splitlines() if re.match(r"\s*ld\.global", ln)]
    masked_st = [ln for ln in ptx.splitlines() if re.search(r"@%p\d+\s+st\.global", ln)]
    return {
        "ptx_ld_v4": sum(".v4." in ln for ln in masked_ld),
        "ptx_ld_narrow": sum(".v4." not in ln for ln in masked_ld),
        "ptx_ld_scalar_coeffs": len(plain_ld),
        "ptx_st_v4": sum(".v4." in ln for ln in masked_st),
        "ptx_st_narrow": [ln.strip() for ln in masked_st if ".v4." not in ln],
    }


def ptx_report(shard: tuple[int, int] | None = None) -> list[dict]:
    """One dict per compiled kernel variant: name, num_warps, BLOCK, ITERS, registers, spill bytes,
    load/store width counts and ``loads_128bit`` (every masked latent load is ld.global.v4 and the
    SASS has no narrower LDG in it besides the coefficient loads).

    Under ``TRITON_INTERPRET=1`` (the CPU test suite) ``@triton.jit`` yields interpreter functions that
    cannot be compiled, so the report is then computed in child processes without that variable, one
    per CPU core (up to 4; the 60 compiles take ~1 min on one core). ``shard=(k, n)`` compiles every
    n-th variant from the k-th.
    """
    tools = toolchain()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _in_children(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    variants = _variants()
    if shard is not None:
        variants = variants[shard[0]::shard[1]]
    for name, fn, sig, consts, num_warps in variants:
        ck = _compile(fn, sig, consts, num_warps)
        row = {"kernel": name, "num_warps": num_warps, "BLOCK": consts.get("BLOCK"),
               "ITERS": consts.get("ITERS")}
        row.update(_ptxas_usage(tools["ptxas"], ck.asm["ptx"]))
        row.update(_cubin_scan(tools["cuobjdump"], ck.asm["cubin"]))
        row.update(_ptx_scan(ck.asm["ptx"]))
        row["spill_bytes"] = (row["spill_stores"] or 0) + (row["spill_loads"] or 0)
        # Narrow stores: only the one fp32 partial sum per program of the reducing kernels.
        row["ptx_st_narrow"] = len(row["ptx_st_narrow"])
        row["loads_128bit"] = row["ptx_ld_v4"] > 0 and row["ptx_ld_narrow"] == 0 and (
            row["sass_ldg_other"] <= row["ptx_ld_scalar_coeffs"])
        rows.append(row)
    return rows


def _in_children(n: int) -> list[dict]:
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--json", f"--shard={k}/{n}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(n)]
    outs = [(p, *p.communicate()) for p in procs]
    rows = []
    for p, out, err in outs:
        if p.returncode == 2:
            raise ToolchainMissing(err.strip())
        if p.returncode != 0:
            raise RuntimeError(f"ptx_report child process failed:\n{err[-4000:]}")
        rows += json.loads(out)
    order = {name: i for i, (name, *_rest) in enumerate(_variants())}
    return sorted(rows, key=lambda r: order[r["kernel"]])


def _print_table(rows) -> None:
    cols = [("kernel", 40), ("num_warps", 5), ("BLOCK", 6), ("ITERS", 5), ("registers", 5),
            ("spill_bytes", 6), ("ptx_ld_v4", 6), ("ptx_ld_narrow", 7), ("sass_ldg128", 7),
            ("sass_stg128", 7), ("loads_128bit", 6)]
    heads = {"kernel": "kernel", "num_warps": "warps", "BLOCK": "BLOCK", "ITERS": "iters",
             "registers": "regs", "spill_bytes": "spill", "ptx_ld_v4": "ld.v4", "ptx_ld_narrow": "ld.nrw",
             "sass_ldg128": "LDG128", "sass_stg128": "STG128", "loads_128bit": "128b"}
    print(" ".join(f"{heads[c]:>{w}}" if c != "kernel" else f"{heads[c]:<{w}}" for c, w in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>{w}}" if c != "kernel" else f"{r[c]:<{w}}" for c, w in cols))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shard = next((tuple(int(i) for i in a.split("=", 1)[1].split("/")) for a in argv
                  if a.startswith("--shard=")), None)
    try:
        rows = ptx_report(shard)
    except ToolchainMissing as exc:
        print(f"ptx_report: {exc}", file=sys.stderr)
        return 2
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    _print_table(rows)
    bad = [r["kernel"] for r in rows if r["spill_bytes"] or not r["loads_128bit"]]
    print(f"\n{len(rows)} kernels; " + ("all with 0 spills and 128-bit loads" if not bad
                                     else f"NOT OK: {', '.join(bad)}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
