"""bench/bench_rewards.py's main() on tiny images with one timed call, writing to a tmp CSV: the rows, the
columns and the images-per-second arithmetic are checked, never the timings; geneval is a row or a
printed skip with its reason."""

import csv
import importlib
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_rewards_writes_a_row_per_reward_and_size(tmp_path, capsys):
    mod = importlib.import_module("bench_rewards")
    out = tmp_path / "rewards.csv"
    names = "jpeg_compressibility,digit,image_similarity,geneval"
    returned = mod.main(
        [
            "--rewards",
            names,
            "--sizes",
            "24,40",
            "--batch",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--timer",
            "cpu",
            "--csv",
            str(out),
        ]
    )
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header == mod.COLUMNS and len(rows) == len(returned)
    printed = capsys.readouterr().out
    geneval = [r for r in rows if r["reward"] == "geneval"]
    assert geneval or "skipped geneval: fastcps.testing.save_tiny_geneval is not here" in printed
    got = sorted((r["reward"], r["image_size"]) for r in rows if r["reward"] != "geneval")
    assert got == sorted(
        [
            ("digit", "16x16"),
            ("image_similarity", "24x24"),
            ("image_similarity", "40x40"),
            ("jpeg_compressibility", "24x24"),
            ("jpeg_compressibility", "40x40"),
        ]
    )  # the toy's digit once, at its own size
    for r in rows:
        assert (
            r["timer"] == "cpu:cpu"
            and r["device"]
            and r["torch"]
            and r["commit"]
            and "transformers" in r["libs"]
            and r["model"]
        )
        assert int(r["batch"]) == 3 and float(r["median_ms_per_batch"]) > 0
        assert float(r["images_per_s"]) == pytest.approx(
            3 / (float(r["median_ms_per_batch"]) / 1e3), rel=1e-3
        )
    with pytest.raises(SystemExit, match="not a local reward"):
        mod.main(["--rewards", "vlm_judge", "--sizes", "24", "--csv", str(out)])
