"""Each kernel benchmark's main() on a tiny size with a tiny repeat count, writing to a tmp CSV: the
columns and rows are checked, never the timings. The CPU fused path runs eagerly here
(--cpu-eager: the compiled path is covered by tests/test_cpu_compiled.py and costs ~20 s of inductor
start-up per graph); the --ptx path runs when Triton and its cuobjdump are present, reading the rows that
common.ptx_rows() compiles once per process (shared with tests/test_ptx_report.py)."""

import csv
import importlib
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("common")

TINY = ["--device", "cpu", "--sizes", "2x17x64", "--repeats", "2", "--warmup", "1", "--cpu-eager"]


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    # main() pins FASTCPS_IMPL / FASTCPS_COMPILE for the CPU path; monkeypatch puts them back after.
    monkeypatch.setenv("FASTCPS_IMPL", "auto")
    monkeypatch.setenv("FASTCPS_COMPILE", "0")


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _check_timing_rows(rows, op, directions):
    assert {(r["direction"], r["impl"]) for r in rows} == {
        (d, i) for d in directions for i in ("fused", "naive")
    }
    for r in rows:
        assert r["op"] == op and r["dtype"] == "fp32" and r["shape"] == "2x17x64"
        assert r["device"] and r["torch"] and r["commit"] and r["timestamp"]
        for col in ("median_ms", "p20_ms", "p80_ms", "GB/s", "%copy_bw", "copy_GB/s", "speedup_vs_naive"):
            assert float(r[col]) > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert int(r["bytes"]) > 0
        assert r["peak_mem_gib"] == ""  # CPU: no allocator statistics


@pytest.mark.parametrize(
    "name, directions", [("bench_cps_step", ["fwd"]), ("bench_cps_logprob_kl", ["fwd", "fwd+bwd"])]
)
def test_bench_main_writes_csv(tmp_path, name, directions):
    mod = importlib.import_module(name)
    out = tmp_path / f"{mod.OP}.csv"
    returned = mod.main([*TINY, "--csv", str(out)])
    header, rows = _read(out)
    assert header == common.COLUMNS
    assert len(rows) == len(returned) == 2 * len(directions)
    _check_timing_rows(rows, mod.OP, directions)
    # A second run appends under the same header.
    mod.main([*TINY, "--csv", str(out)])
    assert len(_read(out)[1]) == 4 * len(directions)


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        common.append_csv(path, [{}])


@pytest.mark.parametrize(
    "name, prefix", [("bench_cps_step", "cps_step["), ("bench_cps_logprob_kl", "logprob_kl_")]
)
def test_ptx_only(tmp_path, name, prefix):
    why = common.ptx_toolchain_missing()
    if why:
        pytest.skip(f"no sm_90 toolchain here: {why}")
    mod = importlib.import_module(name)
    out = tmp_path / "ptx.csv"
    mod.main(["--ptx-only", "--ptx-csv", str(out), "--csv", str(tmp_path / "unused.csv")])
    header, rows = _read(out)
    assert header == common.PTX_COLUMNS
    assert rows and all(r["kernel"].startswith(prefix) for r in rows)
    for r in rows:
        int(r["registers"]), int(r["spill_bytes"]), int(r["ptx_ld_v4"])
        assert r["ptxas"].startswith("ptxas"), r
    assert not (tmp_path / "unused.csv").exists()
