"""Compile every fused kernel for sm_90 without a GPU and report registers, spills and load widths.

Each variant (latent dtype × mode, at the heuristic tilings of (1, 4096·64) and (16, 4096·64)) is built
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and the launch options the
kernels use (num_warps, ``enable_fp_fusion=FP_FUSION``); pointers, N, the row strides and n_chunks
are marked 16-divisible (``tt.divisibility``), which is what Triton's runtime specialisation gives for
real latents (N a multiple of 16, 16-byte aligned allocations). Everything is then read from the
cubin Triton built (nothing is assembled a second time, so the report sees exactly the toolchain
Triton picked: ``ptxas-blackwell`` for sm_90 in Triton 3.9):

- ``cuobjdump -res-usage -sass`` on the cubin (cuobjdump found by Triton's own
  ``triton.tools.disasm.path_to_cuobjdump``, i.e. ``triton.knobs.nvidia.cuobjdump``): registers
  (REG), stack frame (STACK) and local memory (LOCAL) per thread, and the SASS;
- spills: bytes of local-memory stores/loads (STL/LDL) in the SASS. These equal ptxas -v's "bytes
  spill stores/loads" (checked on forced-spill kernels: 124/124, 220/220, 840/840 bytes);
- load/store width: every predicated (masked, i.e. latent) ``ld.global`` in the PTX must be
  ``.v4.b32`` (16 bytes: 4 fp32 or 8 bf16/fp16), and the SASS must load with ``LDG.E.128``; the
  only narrower LDGs allowed are the unpredicated per-row fp32 coefficient loads;
- ``ptxas``: the assembler and version recorded in the cubin's ``.note.nv.tkinfo`` (Triton 3.9's
  ptxas-blackwell writes one); without a note (Triton 3.8's ptxas 12.9 writes none) the ptxas Triton
  runs for sm_90 and its ``--version``, as 'ptxas 12.9.86 (path)' (``_triton_ptxas``). The table's
  header names that ptxas and the Triton version.

``problems(row)`` states every failed check; bench/ptx_controls.py holds two kernels it must flag (a
stride-2 latent load, a maxnreg=24 spill), compiled by the same code (``--controls``).

Measured with Triton 3.8.0 (ptxas 12.9.86, the one Triton bundles and runs for sm_90; cuobjdump from
the same wheel), sm_90a, 2026-12-04, 60 variants (3 dtypes × {cps_step noise/seed/prev ± mean,
logprob_kl fwd/bwd ± v_ref} × tilings B = 1 and B = 16 of N = 4096·64), ``enable_fp_fusion=True``;
compile figures, no GPU; the table is bench/results/ptx_report_triton3.8.0.txt:

    tiling: 4 warps, BLOCK = 16 B/thread·32·4 = 512 fp32 / 1024 bf16|fp16 elements;
            ITERS = 1 at B = 1 (512 or 256 programs), 8 fp32 / 4 half at B = 16 (the loop runs;
            LLVM or ptxas unrolls it in some variants: up to 32 LDG.E.128 per program).
    every variant: 0 spill bytes (no STL/LDL), 0 stack frame, no local memory, every masked latent
    load ld.global.v4.b32 in PTX and LDG.E.128 in SASS.
    registers 27-48 at B = 1 (the most: cps_step[bf16|fp16,seed]), 30-56 at B = 16 (the most:
    cps_step[bf16,seed,mean], cps_step[fp16,seed], logprob_kl_fwd[bf16|fp16,ref]); 33 of 60 use
    ≤ 32. The seeded cps_step variants: 32-48 at B = 1, 40-56 at B = 16.
    Occupancy (registers go per warp in steps of 8 per thread): ≤ 32 regs gives all 2048 threads/SM,
    40 gives 1536, 41-48 give 1280, 56 gives 1152; the unrolled variants trade that for several
    independent 16-byte loads in flight per thread (bench timings on a GPU: not measured here).

The seeded variants reach zero because cps_step draws with ``kernels/cps_step.py::_randn``: ``tl.randn``
bit for bit, with libdevice's cosine transcribed without its Payne-Hanek slow path
(``_cosf_fast_path``). Drawing ``tl.randn`` itself, the same 12 variants had a 32 B stack frame,
32 B STL + 48 B LDL (fp32) or 64 B STL + 96 B LDL (bf16/fp16) -- the slow path's 28-byte table, on a
branch Box-Muller's angle in [0, 2π) never takes -- and 32-47 registers.

Also measured with Triton 3.9.0 (a /tmp venv; cubins built by ptxas-blackwell 13.4.59, which the
report names both from the cubins' note and as the ptxas Triton runs for sm_90), same code, same day:
every variant 0 spills, 0 stack, no local memory; registers 26-32 at B = 1, 30-56 at B = 16 (seeded
32 at B = 1, 40-56 at B = 16); 38 of 60 use ≤ 32.

    Controls (``--controls``, Triton 3.8.0): control_strided_load 4 ld.global.b32, 0 LDG.E.128;
    control_spill (maxnreg=24) 36 B STL + 36 B LDL, 40 B stack frame (Triton 3.9.0 / ptxas-blackwell
    13.4.59 gave 124 + 124 B and 128 B); ``problems`` flags both.

``python bench/ptx_report.py`` prints the per-kernel table; ``--json`` the rows; ``--controls`` the
control kernels instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

__all__ = ["ToolchainMissing", "problems", "ptx_report", "scan_cuobjdump", "scan_ptx", "toolchain"]

# Arguments that Triton's runtime marks 16-divisible for real latents (pointers are added by type).
_BATCHES = (1, 16)
_DIVISIBLE_INTS = {"N", "stride_x", "stride_v", "stride_noise", "stride_prev", "stride_vref", "n_chunks"}
# More than 128 registers halves occupancy below 1024 threads/SM; a streaming kernel should not need it.
_MAX_REGISTERS = 128
# Narrow (scalar) stores allowed per kernel: the fp32 partial sums, one per program (two with v_ref).
_MAX_NARROW_STORES = 2
# Global/local loads and stores with their suffixes; not LDGSTS/LDGDEPBAR (async copies to shared).
_SASS_MEM_OP = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])")


class ToolchainMissing(RuntimeError):
    """Triton, its NVIDIA backend or the cuobjdump it uses cannot be found."""


def toolchain() -> dict:
    """The tools the report uses, found the way Triton finds them; raises ToolchainMissing naming
    what is absent. (ptxas is Triton's business: the report reads its output, the cubin.)"""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.tools.disasm import path_to_cuobjdump
    except Exception as exc:  # pragma: no cover - depends on the install
        raise ToolchainMissing(
            f"triton (with its NVIDIA backend and triton.tools.disasm) is not importable: {exc}"
        ) from exc
    try:
        found = path_to_cuobjdump()
    except Exception as exc:
        raise ToolchainMissing(
            f"Triton cannot find cuobjdump ({exc}); reinstall triton or point TRITON_CUOBJDUMP_PATH at one"
        ) from exc
    # Older Triton (before triton.knobs) returned (path, version) here; with knobs it is the path.
    return {"cuobjdump": found[0] if isinstance(found, tuple) else found, "ptxas": _triton_ptxas()}


def _triton_ptxas(arch: int = 90) -> str:
    """The assembler Triton runs for ``arch``, as 'ptxas 12.9.86 (path)': Triton's own choice and that
    binary's ``--version``. Found by feature, not by version: ``triton.backends.nvidia.compiler.get_ptxas``
    (3.8 and 3.9: 3.8 picks its bundled ptxas for sm_90, 3.9 ptxas-blackwell), else
    ``triton.knobs.nvidia.ptxas``; a (path, version) pair as older releases gave is read as its path.
    'unknown' when neither exists or the binary does not run."""
    try:
        from triton.backends.nvidia import compiler as nv

        if hasattr(nv, "get_ptxas"):
            try:
                tool = nv.get_ptxas(arch)
            except TypeError:  # a release whose get_ptxas takes no architecture
                tool = nv.get_ptxas()
        else:
            from triton import knobs

            tool = knobs.nvidia.ptxas
        path = tool.path if hasattr(tool, "path") else tool[0] if isinstance(tool, tuple) else str(tool)
        text = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    except Exception:  # noqa: BLE001 - the report still runs; the field then says so
        return "unknown"
    version = re.search(r"release [\d.]+, V([\d.]+)", text)
    return f"{os.path.basename(path)} {version.group(1) if version else '?'} ({path})"


def _variants(controls: bool = False):
    """(name, kernel, signature, constexprs, compile options) for every variant, in report order."""
    if controls:
        # bench/ is on sys.path: it is sys.path[0] when this file runs as a script (the child
        # processes), and the benches and tests put it there.
        from ptx_controls import control_variants

        return control_variants()
    from fastcps.kernels import cps_logprob_kl, cps_step

    # B = 1: one block per program (ITERS = 1, 512 programs at N = 4096·64);
    # B = 16: the chunk loop runs (ITERS = 8 fp32 / 4 half), which ptxas may unroll.
    out = []
    for batch in _BATCHES:
        for name, fn, sig, consts, num_warps in cps_step.compile_variants(
            batch
        ) + cps_logprob_kl.compile_variants(batch):
            options = {"num_warps": num_warps, "enable_fp_fusion": cps_step.FP_FUSION}
            out.append((name, fn, sig, consts, options))
    return out


def _compile(fn, sig, consts, options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {}
    for i, (k, t) in enumerate(sig.items()):
        if t.startswith("*") or k in _DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _cubin_tool(cubin: bytes) -> str:
    """Assembler and version recorded in the cubin's .note.nv.tkinfo, e.g. 'ptxas-blackwell 13.4.59'."""
    name = re.search(rb"\x00(ptxas[\w-]*)\x00", cubin)
    version = re.search(rb"compilation tools, release [\d.]+, V([\d.]+)", cubin)
    return " ".join(m.group(1).decode() for m in (name, version) if m) or "unknown"


def _width_bytes(suffix: str) -> int:
    """Bytes moved by one SASS LDG/STG/LDL/STL with this suffix (e.g. '.E.128', '.LU.64', '.U8')."""
    parts = set(suffix.split("."))
    for tags, size in (({"128"}, 16), ({"64"}, 8), ({"U16", "S16"}, 2), ({"U8", "S8"}, 1)):
        if parts & tags:
            return size
    return 4


def scan_cuobjdump(text: str) -> dict:
    """Registers, stack, local memory, spill bytes and LDG/STG widths from ``cuobjdump -res-usage
    -sass`` of a one-kernel cubin. Raises ValueError when the resource line is missing."""
    res = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if res is None:
        raise ValueError(
            "cuobjdump -res-usage printed no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line; "
            f"its output began:\n{text[:2000]}"
        )
    ops = {"LDG": [], "STG": [], "LDL": [], "STL": []}
    for op, suffix in _SASS_MEM_OP.findall(text):
        ops[op].append(suffix)
    return {
        "registers": int(res.group(1)),
        "stack_bytes": int(res.group(2)),
        "cubin_local_bytes": int(res.group(3)),
        "spill_stores": sum(_width_bytes(s) for s in ops["STL"]),
        "spill_loads": sum(_width_bytes(s) for s in ops["LDL"]),
        "sass_ldg128": sum(".128" in s for s in ops["LDG"]),
        "sass_ldg_other": sum(".128" not in s for s in ops["LDG"]),
        "sass_stg128": sum(".128" in s for s in ops["STG"]),
        "sass_stg_other": sum(".128" not in s for s in ops["STG"]),
    }


def scan_ptx(ptx: str) -> dict:
    """Masked (latent) global loads/stores by width, and the unmasked (coefficient) loads."""
    lines = ptx.splitlines()
    masked_ld = [ln for ln in lines if re.search(r"@!?%p\d+\s+ld\.global", ln)]
    masked_st = [ln for ln in lines if re.search(r"@!?%p\d+\s+st\.global", ln)]
    return {
        "ptx_ld_v4": sum(".v4." in ln for ln in masked_ld),
        "ptx_ld_narrow": sum(".v4." not in ln for ln in masked_ld),
        "ptx_ld_scalar_coeffs": sum(bool(re.match(r"\s*ld\.global", ln)) for ln in lines),
        "ptx_st_v4": sum(".v4." in ln for ln in masked_st),
        "ptx_st_narrow": sum(".v4." not in ln for ln in masked_st),
    }


def _load_problems(row: dict) -> list[str]:
    k, out = row["kernel"], []
    if row["ptx_ld_narrow"] or not row["ptx_ld_v4"]:
        out.append(
            f"{k}: {row['ptx_ld_narrow']} masked (latent) PTX loads are narrower than ld.global.v4 "
            f"({row['ptx_ld_v4']} are v4)"
        )
    if not row["sass_ldg128"]:
        out.append(f"{k}: no LDG.E.128 in the SASS")
    if row["sass_ldg_other"] > row["ptx_ld_scalar_coeffs"]:
        out.append(
            f"{k}: {row['sass_ldg_other']} narrow LDGs in the SASS, more than its "
            f"{row['ptx_ld_scalar_coeffs']} unmasked coefficient loads"
        )
    return out


def problems(row: dict) -> list[str]:
    """Every sm_90 check the row fails, as sentences naming the kernel; [] when it passes."""
    k, out = row["kernel"], []
    if row["spill_bytes"]:
        out.append(
            f"{k}: spills to local memory: {row['spill_stores']} B of STL and {row['spill_loads']} B "
            "of LDL in the SASS"
        )
    if row["stack_bytes"] or row["cubin_local_bytes"]:
        out.append(
            f"{k}: uses local memory: {row['stack_bytes']} B stack frame, "
            f"{row['cubin_local_bytes']} B local per thread"
        )
    if row["registers"] > _MAX_REGISTERS:
        out.append(f"{k}: {row['registers']} registers per thread (> {_MAX_REGISTERS})")
    out += _load_problems(row)
    if row["ptx_st_narrow"] > _MAX_NARROW_STORES:
        out.append(
            f"{k}: {row['ptx_st_narrow']} masked PTX stores narrower than st.global.v4 "
            f"(at most {_MAX_NARROW_STORES} partial sums allowed)"
        )
    return out


def _report_row(name, consts, options, ck, tools: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        text = subprocess.run(
            [tools["cuobjdump"], "-res-usage", "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    # The cubin's own note when it has one (Triton 3.9's ptxas-blackwell writes it; 3.8's ptxas 12.9 does
    # not): else the assembler Triton runs for sm_90.
    tool = _cubin_tool(ck.asm["cubin"])
    row = {
        "kernel": name,
        "num_warps": options["num_warps"],
        "BLOCK": consts.get("BLOCK"),
        "ITERS": consts.get("ITERS"),
        "ptxas": tools["ptxas"] if tool == "unknown" else tool,
    }
    try:
        row.update(scan_cuobjdump(text))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    row.update(scan_ptx(ck.asm["ptx"]))
    row["spill_bytes"] = row["spill_stores"] + row["spill_loads"]
    row["loads_128bit"] = not _load_problems(row)
    return row


def ptx_report(shard: tuple[int, int] | None = None, controls: bool = False) -> list[dict]:
    """One dict per compiled kernel variant (the control kernels with ``controls``): name, num_warps,
    BLOCK, ITERS, ptxas, registers, spill/stack/local bytes, load/store width counts and
    ``loads_128bit`` (no load-width problem). See ``problems`` for the checks.

    Under ``TRITON_INTERPRET=1`` (the CPU test suite) ``@triton.jit`` yields interpreter functions that
    cannot be compiled, so the report is then computed in child processes without that variable, one
    per CPU core (up to 4). ``shard=(k, n)`` compiles every n-th variant from the k-th.
    """
    tools = toolchain()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _in_children(1 if controls else max(1, min(4, os.cpu_count() or 1)), controls)
    variants = _variants(controls)
    if shard is not None:
        variants = variants[shard[0] :: shard[1]]
    return [
        _report_row(name, consts, options, _compile(fn, sig, consts, options), tools)
        for name, fn, sig, consts, options in variants
    ]


def _in_children(n: int, controls: bool) -> list[dict]:
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.abspath(__file__), "--json"] + (["--controls"] if controls else [])
    procs = [
        subprocess.Popen(
            cmd + [f"--shard={k}/{n}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k in range(n)
    ]
    shards = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode == 2:
            raise ToolchainMissing(err.strip())
        if p.returncode != 0:
            raise RuntimeError(f"ptx_report child process ({' '.join(p.args[1:])}) failed:\n{err[-4000:]}")
        shards.append(json.loads(out))
    # Child k compiled variants k, k+n, k+2n, ...: interleave back into report order.
    rows = [None] * sum(len(s) for s in shards)
    for k, shard_rows in enumerate(shards):
        rows[k::n] = shard_rows
    return rows


def _print_table(rows) -> None:
    cols = [
        ("kernel", 40),
        ("num_warps", 5),
        ("BLOCK", 6),
        ("ITERS", 5),
        ("registers", 5),
        ("spill_bytes", 6),
        ("stack_bytes", 6),
        ("ptx_ld_v4", 6),
        ("ptx_ld_narrow", 7),
        ("sass_ldg128", 7),
        ("sass_stg128", 7),
        ("loads_128bit", 6),
    ]
    heads = {
        "kernel": "kernel",
        "num_warps": "warps",
        "BLOCK": "BLOCK",
        "ITERS": "iters",
        "registers": "regs",
        "spill_bytes": "spill",
        "stack_bytes": "stack",
        "ptx_ld_v4": "ld.v4",
        "ptx_ld_narrow": "ld.nrw",
        "sass_ldg128": "LDG128",
        "sass_stg128": "STG128",
        "loads_128bit": "128b",
    }
    print(" ".join(f"{heads[c]:>{w}}" if c != "kernel" else f"{heads[c]:<{w}}" for c, w in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>{w}}" if c != "kernel" else f"{r[c]:<{w}}" for c, w in cols))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shard = next(
        (tuple(int(i) for i in a.split("=", 1)[1].split("/")) for a in argv if a.startswith("--shard=")), None
    )
    try:
        rows = ptx_report(shard, controls="--controls" in argv)
    except ToolchainMissing as exc:
        print(f"ptx_report: {exc}", file=sys.stderr)
        return 2
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    import triton

    built = sorted({r["ptxas"] for r in rows})
    runs = toolchain()["ptxas"]
    print(
        f"triton {triton.__version__}, ptxas for sm_90: {runs}"
        + ("" if built == [runs] else f"; cubins built by: {', '.join(built)}")
        + "\n"
    )
    _print_table(rows)
    bad = [p for r in rows for p in problems(r)]
    print(
        f"{len(rows)} kernels; "
        + ("all with 0 spills and 128-bit loads" if not bad else "NOT OK:\n  " + "\n  ".join(bad))
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
