"""The trainer's wiring across processes and restarts (issue 9, part 3), DeepSpeed ZeRO-3 on gloo:

- ranks: one process and two produce the same images, rewards and advantages for every sample (same
  seeds), and the update gives each sample its own advantage;
- resume: a run stopped after an epoch and resumed ends where the uninterrupted run ends: weights,
  rewards, and the epochs it ran (one process, fp32; two ranks with LoRA, EMA and bf16);
- SIGTERM: the signalled run writes a checkpoint and exits; the resumed run continues at the epoch in
  flight and ends with the uninterrupted run's weights.

The runs share interpreters (tests/multi_run.py: several trainings, one after the other, in one set of
ranks): one fixture with one process, one with two ranks, plus the signalled process.
"""

import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastcps.checkpoint import ExportedWeights
from multi_run import DIGITS_CONFIG, TINY_DIGITS, child_env, launch, start, stop
from wiring_support import advantages_by_hand, load_dump

pytestmark = pytest.mark.slow

CONFIG = DIGITS_CONFIG
COMMON = TINY_DIGITS
# One process: minibatch 4 x accumulation 2, one optimizer step an epoch.
ONE = COMMON + ["train.gradient_accumulation_steps=2"]
# Two ranks, 4 samples each: one optimizer step an epoch too (gradients averaged over the ranks), so the
# second epoch's images match one process's.
TWO = COMMON
# Full fine-tuning, 2 windows of one minibatch per rank and epoch, minibatches laid out as the rollout's
# batches
REUSE = ["train.rollout_batch_size=2", "train.minibatch_size=2"]
LORA_EMA_BF16 = [
    'policy.lora={"r": 4, "alpha": 8}',
    "train.ema_decay=0.9",
    "policy.dtype=bf16",
    "train.minibatch_size=2",
]


def run(out: Path, name: str, epochs: int, sets: list[str]) -> list[str]:
    items = sets + [f"output_dir={out}", f"name={name}", f"train.num_epochs={epochs}"]
    return ["--config", CONFIG] + [a for kv in items for a in ("--set", kv)]


def resume(run_dir: Path, epochs: int) -> list[str]:
    return ["--resume", str(run_dir), "--set", f"train.num_epochs={epochs}"]


def signal_after_first_epoch(out: Path, timeout: float = 300) -> str:
    """Start run ``term`` (200 epochs) as ``python -m fastcps.train``, send SIGTERM once its first epoch
    is logged, wait for it to exit; returns its output. The process is killed on the way out whatever
    happens, and every wait has a timeout."""
    proc = start([sys.executable, "-m", "fastcps.train"] + run(out, "term", 200, ONE), child_env())
    lines, first_epoch = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[fastcps] epoch 1/"):
                first_epoch.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not first_epoch.wait(0.5):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "no epoch logged:\n" + "".join(lines)[-3000:]
            )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    return "".join(lines)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    term_log = signal_after_first_epoch(out)
    runs = [
        run(out, "full", 3, ONE),
        run(out, "part", 1, ONE),
        resume(out / "part", 3),
        resume(out / "term", 3),
        run(out, "ranks", 2, ONE),
    ]
    log = launch(runs, 1, dump=out / "dump")[0]
    return {"out": out, "log": log, "term_log": term_log, "ranks_run": 4}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    runs = [
        run(out, "ranks", 2, TWO),
        run(out, "full", 2, TWO + LORA_EMA_BF16),
        run(out, "part", 1, TWO + LORA_EMA_BF16),
        resume(out / "part", 2),
        run(out, "reuse", 2, TWO + REUSE),
    ]
    log = launch(runs, 2, dump=out / "dump")[0]
    return {"out": out, "log": log, "ranks_run": 0}


# --- ranks -------------------------------------------------------------------------------------------


def test_one_and_two_ranks_feed_the_update_the_same_samples(one_process, two_ranks):
    """Per (epoch, global sample index, trained step), what the update's micro-step received: latents
    before and after the step, prompt slot, reward, advantage. The first epoch must agree to rounding
    (same seeds, same batch shapes); the second too, after one optimizer step on gradients summed in
    another order (measured: latents 6e-7, rewards 1e-7, advantages 1.4e-6 apart). And in each run,
    each sample's advantage is the one its own reward and group give."""
    one = load_dump(one_process["out"] / "dump", one_process["ranks_run"])
    two = load_dump(two_ranks["out"] / "dump", two_ranks["ranks_run"])
    expected = {(e, i, j) for e in range(2) for i in range(8) for j in range(3)}
    assert one.keys() == expected and two.keys() == expected
    for key in sorted(expected):
        a, b = one[key], two[key]
        tol = 1e-6 if key[0] == 0 else 2e-5
        assert a["group"] == b["group"], key
        assert abs(a["reward"] - b["reward"]) <= tol, (key, a["reward"], b["reward"])
        assert abs(a["adv"] - b["adv"]) <= 10 * tol, (key, a["adv"], b["adv"])
        for field in ("x_t", "x_next"):
            gap = float((a[field] - b[field]).abs().max())
            assert gap <= tol, f"{field} of sample {key} differs by {gap:.3g} between 1 and 2 processes"
    for dump in (one, two):
        for epoch in range(2):
            samples = [dump[(epoch, i, 0)] for i in range(8)]
            groups = [s["group"] for s in samples]
            assert sorted(groups) == [0] * 4 + [1] * 4
            for i, adv in enumerate(advantages_by_hand([s["reward"] for s in samples], groups)):
                for j in range(3):
                    assert dump[(epoch, i, j)]["adv"] == pytest.approx(adv, rel=1e-5, abs=1e-6), (epoch, i, j)


# --- resume, SIGTERM --------------------------------------------------------------------------------


def epochs_after_resume(log: str, run_dir: Path) -> tuple[int, list[int]]:
    """(epoch the resumed run of ``run_dir`` started at, the epochs it then logged), from its output."""
    lines = log.splitlines()
    start = next(
        k for k, line in enumerate(lines) if line.startswith(f"[fastcps] resumed {run_dir} at epoch ")
    )
    ran = []
    for line in lines[start + 1 :]:
        if line.startswith("[fastcps] done in"):
            break
        m = re.match(r"\[fastcps\] epoch (\d+)/\d+:", line)
        ran += [int(m[1])] if m else []
    return int(lines[start].rsplit(" ", 1)[1]), ran


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_end(full: Path, resumed: Path, epochs: int, ranks: int = 1) -> None:
    """The resumed run ends with the uninterrupted run's trained weights, EMA (each rank's) and per-epoch
    rewards, bit for bit."""
    a = ExportedWeights(full / "checkpoints" / "final").load_all()
    b = ExportedWeights(resumed / "checkpoints" / "final").load_all()
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, f"final weights differ by up to {worst:.3g}"
    ra, rb = metrics(full), metrics(resumed)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == list(range(1, epochs + 1))
    assert [r["reward/mean"] for r in ra] == [r["reward/mean"] for r in rb]
    for rank in range(ranks):
        ema = [
            full / "checkpoints" / "final" / f"ema_rank{rank}.pt",
            resumed / "checkpoints" / "final" / f"ema_rank{rank}.pt",
        ]
        if ema[0].exists() or ema[1].exists():
            sa, sb = (torch.load(p)["shadow"] for p in ema)
            assert all(torch.equal(x, y) for x, y in zip(sa, sb)), f"EMA of rank {rank} differs"


def test_resume_matches_an_uninterrupted_run(one_process):
    out = one_process["out"]
    assert epochs_after_resume(one_process["log"], out / "part") == (1, [2, 3])
    assert_same_end(out / "full", out / "part", 3)


def test_sigterm_checkpoints_and_the_resumed_run_continues_as_if_uninterrupted(one_process):
    out = one_process["out"]
    # Signalled in the second epoch: in its rollout, the checkpoint is "before epoch 2" and the resume
    # runs it again; in its update, the update finishes and the checkpoint is "after epoch 2".
    m = re.search(r"interrupted: checkpoint (\S+interrupted_epoch0000([12]));", one_process["term_log"])
    assert m and m[1] == str(out / "term" / "checkpoints" / f"interrupted_epoch0000{m[2]}"), one_process[
        "term_log"
    ][-2000:]
    assert ExportedWeights(Path(m[1])).keys()
    done = int(m[2])
    assert epochs_after_resume(one_process["log"], out / "term") == (done, list(range(done + 1, 4)))
    assert_same_end(out / "full", out / "term", 3)


def test_resume_at_two_ranks_with_lora_ema_bf16_matches_an_uninterrupted_run(two_ranks):
    out = two_ranks["out"]
    assert epochs_after_resume(two_ranks["log"], out / "part") == (1, [2])
    assert_same_end(out / "full", out / "part", 2, ranks=2)
    final = out / "part" / "checkpoints" / "final"
    assert json.loads((out / "part" / "config.json").read_text())["policy"]["dtype"] == "bf16"
    assert (final / "ema_rank0.pt").is_file() and (final / "ema_rank1.pt").is_file()
    lora = load_file(str(final / "policy.safetensors"))
    assert all(".lora_" in k for k in lora) and any(
        float(t.abs().max()) > 0 for k, t in lora.items() if "lora_B" in k
    )
    # a LoRA checkpoint holds no frozen weight (they come back from policy.pretrained), and resumes exactly
    for states in final.glob("*model_states.pt"):
        saved = torch.load(states, weights_only=False)
        assert saved["module"] and all(".lora_" in k for k in saved["module"]), states
        assert saved.get("frozen_param_fragments") is None and saved.get("frozen_param_shapes") is None, (
            states
        )


def test_old_log_probs_at_two_ranks_reuse_the_rollouts_or_recompute_and_the_ratio_is_exactly_1(two_ranks):
    """run_update's choice at 2 ranks (decided together: a rank that differed would recompute alone and
    hang the other's collectives). Full fine-tuning in fp32 with minibatches laid out as the rollout's
    batches: every first-window log-prob equals the rollout's on both ranks, so the later window uses the
    rollout's (no recompute forward). LoRA + EMA in bf16 with minibatches of 2 under rollout batches of 4:
    another layout, so every epoch recomputes. Either way the first window's ratio is exactly 1."""
    out = two_ranks["out"]
    rows = {
        name: [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("reuse", "full")
    }
    trained = {name: [r for r in rs if "train/loss" in r] for name, rs in rows.items()}
    assert len(trained["reuse"]) == len(trained["full"]) == 2
    assert [r["train/old_logprob_recomputed"] for r in trained["reuse"]] == [0.0, 0.0]
    assert [r["train/old_logprob_recomputed"] for r in trained["full"]] == [1.0, 1.0]
    for name in rows:
        assert [r["train/ratio_dev"] for r in trained[name]] == [0.0, 0.0], name
