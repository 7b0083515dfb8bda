"""Every fused kernel compiles for sm_90 (no GPU needed) with 0 spill bytes and 128-bit latent loads,
and the report's checks do flag a spill and a narrow load.

The 60 variants are compiled once per test run, in child processes without TRITON_INTERPRET (see
bench/ptx_report.py), through ``common.ptx_rows()``: tests/test_bench_smoke.py::test_ptx_only reads the
same rows, so neither compiles twice.
"""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("common")
report = common.load_ptx_report()


def _skip_without_toolchain():
    why = common.ptx_toolchain_missing()
    if why:
        pytest.skip(f"cannot compile for sm_90 here: {why}")


@pytest.fixture(scope="module")
def rows():
    _skip_without_toolchain()
    return common.ptx_rows()


def test_every_kernel_and_mode_is_reported(rows):
    names = {r["kernel"] for r in rows}
    for dt in ("fp32", "bf16", "fp16"):
        for b in (1, 16):
            for mode in ("noise", "seed", "prev"):
                assert f"cps_step[{dt},{mode}]@B={b}" in names
                assert f"cps_step[{dt},{mode},mean]@B={b}" in names
            for k in ("fwd", "bwd"):
                assert f"logprob_kl_{k}[{dt}]@B={b}" in names
                assert f"logprob_kl_{k}[{dt},ref]@B={b}" in names
    assert len(rows) == len(names) == 60
    assert any(r["ITERS"] > 1 for r in rows), "the chunk loop (ITERS > 1) must be compiled too"
    # the assembler and its version: from the cubin's note (Triton 3.9) or the ptxas Triton runs (3.8)
    assert all(re.match(r"ptxas[\w-]* \d+\.\d+", r["ptxas"]) for r in rows), {r["ptxas"] for r in rows}


def test_no_spills_no_local_memory(rows):
    for r in rows:
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} bytes: {r}"
        assert r["stack_bytes"] == 0 and r["cubin_local_bytes"] == 0, f"{r['kernel']} uses local memory: {r}"
        assert 0 < r["registers"] <= 128, f"{r['kernel']} uses {r['registers']} registers"


def test_latent_loads_and_stores_are_128_bit(rows):
    for r in rows:
        assert r["ptx_ld_v4"] > 0 and r["ptx_ld_narrow"] == 0, f"{r['kernel']}: non-v4 masked loads: {r}"
        assert r["sass_ldg128"] > 0, f"{r['kernel']}: no LDG.E.128 in SASS: {r}"
        assert r["loads_128bit"], r
        # at most the one scalar partial-sum store per program (two with v_ref)
        assert r["ptx_st_narrow"] <= 2, f"{r['kernel']}: narrow stores: {r}"


def test_report_finds_no_problem(rows):
    assert [p for r in rows for p in report.problems(r)] == []


def test_checks_flag_a_narrow_load_and_a_spill_in_compiled_controls():
    # bench/ptx_controls.py: a stride-2 latent load and a maxnreg=24 kernel, compiled like the real ones.
    _skip_without_toolchain()
    found = {r["kernel"]: r for r in report.ptx_report(controls=True)}
    narrow, spill = found["control_strided_load"], found["control_spill"]
    assert narrow["ptx_ld_narrow"] > 0 and narrow["sass_ldg128"] == 0 and not narrow["loads_128bit"], narrow
    assert any("narrower than ld.global.v4" in p for p in report.problems(narrow)), report.problems(narrow)
    assert spill["spill_bytes"] > 0 and spill["stack_bytes"] > 0 and spill["loads_128bit"], spill
    assert any("spills to local memory" in p for p in report.problems(spill)), report.problems(spill)


def test_kernel_cosine_is_libdevice_cosf_without_its_local_memory():
    """cps_step's seeded noise is tl.randn bit for bit only while _cosf_fast_path holds libdevice cosf's
    constants (tests/test_philox.py checks the arithmetic on them); this Triton's libdevice decides."""
    _skip_without_toolchain()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, ptx_controls; print(json.dumps(ptx_controls.cosine_ptx()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    ptx = json.loads(out.stdout)
    consts = {k: set(re.findall(r"\b0f([0-9A-F]{8})\b", text)) for k, text in ptx.items()}
    # libdevice's alone: the slow path's bound 105615 and inf, and -1 (it negates with an fma);
    # the fast path's alone: 1.5·2**23 (its rint). 0 and 1 are in both.
    assert consts["libdevice"] - {"47CE4780", "7F800000", "BF800000"} == consts["fast_path"] - {"4B400000"}
    assert len(consts["fast_path"]) == 14, consts
    assert ".local" in ptx["libdevice"] and "__cudart_i2opi_f" in ptx["libdevice"]
    assert ".local" not in ptx["fast_path"] and "__cudart_i2opi_f" not in ptx["fast_path"]


# The scanners on hand-written snippets (Triton 3.9 PTX, cuobjdump 13.1 SASS): no compile needed.
_PTX = """
\tld.global.b32 \t{ %r1 }, [ %rd1 + 0 ];
\t@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd2 + 0 ];
\t@%p1 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
\t@%p2 st.global.v4.b32 [ %rd4 + 0 ], { %r2, %r3, %r4, %r5 };
\t@%p3 st.global.b32 [ %rd5 + 0 ], { %r6 };
"""
_CUOBJDUMP = """
Resource usage:
 Function k:
  REG:24 STACK:128 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
        /*0090*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a0*/              @!P0 LDG.E R8, desc[UR4][R6.64] ;
        /*00b0*/                   STL.64 [R1+0x8], R4 ;
        /*00c0*/                   STL [R1], R9 ;
        /*00d0*/                   LDL.LU.64 R4, [R1+0x8] ;
        /*00e0*/                   STG.E.128 desc[UR4][R10.64], R4 ;
        /*00f0*/                   LDGSTS.E.128 [R0], desc[UR4][R2.64] ;
"""


def test_scan_ptx_counts_narrow_masked_loads():
    got = report.scan_ptx(_PTX)
    assert got == {
        "ptx_ld_v4": 1,
        "ptx_ld_narrow": 1,
        "ptx_ld_scalar_coeffs": 1,
        "ptx_st_v4": 1,
        "ptx_st_narrow": 1,
    }


def test_scan_cuobjdump_reads_registers_spills_and_widths():
    got = report.scan_cuobjdump(_CUOBJDUMP)
    assert got == {
        "registers": 24,
        "stack_bytes": 128,
        "cubin_local_bytes": 0,
        "spill_stores": 12,
        "spill_loads": 8,
        "sass_ldg128": 1,
        "sass_ldg_other": 1,
        "sass_stg128": 1,
        "sass_stg_other": 0,
    }
    with pytest.raises(ValueError, match="REG"):
        report.scan_cuobjdump("cuobjdump info: File does not contain device code")
