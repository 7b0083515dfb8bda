"""Every fused kernel compiles for sm_90 (no GPU needed) with 0 spill bytes and 128-bit latent loads.

The compile runs in a child process without TRITON_INTERPRET (see bench/ptx_report.py); it takes
about a minute on 2 CPU cores (60 variants).
"""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "ptx_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("fastcps_bench_ptx_report", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rows():
    mod = _load()
    try:
        return mod.ptx_report()
    except mod.ToolchainMissing as exc:
        pytest.skip(f"cannot compile for sm_90 here: {exc}")


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
    assert any(r["ITERS"] > 1 for r in rows), "the chunk loop (ITERS > 1) must be compiled too"


def test_no_spills(rows):
    for r in rows:
        assert r["registers"] is not None and r["spill_stores"] is not None, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} bytes"
        assert r["cubin_local_bytes"] in (0, None), f"{r['kernel']} uses local memory: {r}"
        assert r["registers"] <= 128, f"{r['kernel']} uses {r['registers']} registers"


def test_latent_loads_are_128_bit(rows):
    for r in rows:
        assert r["ptx_ld_v4"] > 0 and r["ptx_ld_narrow"] == 0, f"{r['kernel']}: non-v4 masked loads: {r}"
        assert r["sass_ldg128"] > 0, f"{r['kernel']}: no LDG.E.128 in SASS: {r}"
        assert r["loads_128bit"], r


def test_latent_stores_are_128_bit(rows):
    for r in rows:
        # at most the one scalar partial-sum store per program
        assert r["ptx_st_narrow"] <= 2, f"{r['kernel']}: narrow stores: {r}"
