"""Crash-safe checkpoints and a run directory every rank must see (issue 25, points 4 and 5).

- A save stopped right after ANY of its files (an injected error where a kill would stop it: DeepSpeed's
  states, the EMA, each exported file, the marker, ``latest``), in a periodic save and in ``final``: the
  resume takes the newest complete checkpoint, says which incomplete one it skipped, and ends with the
  uninterrupted run's weights and EMA, bit for bit. A checkpoint written before the marker existed
  (``tests/data/legacy_run``) resumes the same way.
- Rotation counts only complete checkpoints and never removes the newest complete one.
- Two "nodes" with their own disks (two rank processes in different working directories, a relative
  ``output_dir``): both ranks stop at start-up with exit code 2 and a message that says what to share.

The tiny toy (``tests/data/tiny_toy_digits.safetensors``, 19.7k parameters) keeps each run at ~3 s; the
runs share one interpreter (tests/multi_run.py).
"""

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcps.checkpoint import ExportedWeights, complete
from multi_run import ROOT, child_env, free_port, launch, start, stop
from checkpoint_support import TINY_TOY

CONFIG = str(ROOT / "configs" / "digits_cps.json")
# tests/data/legacy_run was written by the code before the marker with these settings (1 process)
TINY = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=4",
    "train.rollout_batch_size=4",
    "train.minibatch_size=4",
    "train.gradient_accumulation_steps=2",
    "train.ema_decay=0.9",
    "eval.every=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.images_every=0",
    "checkpoint.every=1",
    f"policy.pretrained={TINY_TOY}",
    f"deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}",
]


def sets(items) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def run(out: Path, name: str, epochs: int) -> list[str]:
    return ["--config", CONFIG] + sets(
        TINY + [f"output_dir={out}", f"name={name}", f"train.num_epochs={epochs}"]
    )


def resume(run_dir: Path, epochs: int) -> list[str]:
    return ["--resume", str(run_dir), "--set", f"train.num_epochs={epochs}"]


def assert_same_end(full: Path, other: Path) -> None:
    """The final checkpoints' exported weights and EMA are equal, bit for bit."""
    a = ExportedWeights(full / "checkpoints" / "final").load_all()
    b = ExportedWeights(other / "checkpoints" / "final").load_all()
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst == 0.0, f"{other.name}: final weights differ by up to {worst:.3g}"
    ema = [torch.load(r / "checkpoints" / "final" / "ema_rank0.pt")["shadow"] for r in (full, other)]
    assert len(ema[0]) == len(ema[1]) and all(torch.equal(x, y) for x, y in zip(*ema)), other.name


def legacy_run_killed_in_its_second_save(folder: Path) -> Path:
    """tests/data/legacy_run (written by the code before the marker: epoch00001 complete, ``latest``
    naming epoch00002) with epoch00002 as that code's save left it when killed between DeepSpeed's
    files and the EMA: DeepSpeed's two files (copied from epoch00001: the same names and sizes; their
    content is never read) and no EMA, no policy.safetensors."""
    shutil.copytree(ROOT / "tests" / "data" / "legacy_run", folder)
    ckpts = folder / "checkpoints"
    assert (ckpts / "latest").read_text() == "epoch00002"
    (ckpts / "epoch00002").mkdir()
    for f in (ckpts / "epoch00001").glob("zero_pp_rank_0_*.pt"):
        shutil.copy(f, ckpts / "epoch00002" / f.name)
    return folder


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The uninterrupted run (3 epochs, a checkpoint after each), recording its saves' files; then, for
    each file j of the second save (epoch00002) and for the last two files of the third (final), a run
    stopped right after that file and its resume to 3 epochs; then the resume of the legacy run."""
    out = tmp_path_factory.mktemp("killed")
    launch([run(out, "full", 3)], 1, writes=out / "writes_full")
    saves = json.loads((out / "writes_full" / "run0.rank0.json").read_text())
    assert len(saves) == 3, saves  # epoch00001, epoch00002, final
    n = len(saves[1])
    kills = [(2, j) for j in range(1, n + 1)] + [(3, n - 1), (3, n)]
    runs, faults = [], {}
    for save, j in kills:
        faults[len(runs)] = (save, j)
        runs += [run(out, f"kill_s{save}_f{j}", 3), resume(out / f"kill_s{save}_f{j}", 3)]
    legacy = legacy_run_killed_in_its_second_save(out / "legacy")
    runs.append(resume(legacy, 3))
    log = launch(runs, 1, writes=out / "writes", faults=faults, timeout=1500)[0]
    (out / "rank0.log").write_text(log)
    return {"out": out, "log": log, "saves": saves, "kills": kills}


def resumed_at(log: str, run_dir: Path) -> int:
    m = re.search(rf"^\[fastcps\] resumed {re.escape(str(run_dir))} at epoch (\d+)$", log, re.M)
    assert m, f"no resume of {run_dir} in the log"
    return int(m[1])


@pytest.mark.slow
def test_a_save_stopped_after_any_of_its_files_resumes_to_the_uninterrupted_run(killed):
    """Seen failing before the marker (the code of 6766eec): the run stopped right after DeepSpeed's
    ``latest`` (third file of its second save) did not resume: exit 2, "No such file or directory:
    .../epoch00002/ema_rank0.pt"."""
    out, log, saves = killed["out"], killed["log"], killed["saves"]
    save2 = saves[1]
    assert save2[:2] == [
        f"epoch00002.partial/zero_pp_rank_0_mp_rank_00_{k}_states.pt" for k in ("model", "optim")
    ]
    assert save2[-2:] == ["epoch00002.partial/complete.json", "latest"], save2  # the marker, then latest
    assert "epoch00002.partial/transformer/diffusion_pytorch_model.safetensors.index.json" in save2
    marker = save2.index("epoch00002.partial/complete.json") + 1
    for save, j in killed["kills"]:
        name = f"kill_s{save}_f{j}"
        assert f"[multi_run] run {2 * killed['kills'].index((save, j))}: injected fault after writing " in log
        counted = save == 3 or j >= marker  # the save counts from its marker on
        assert resumed_at(log, out / name) == (save if counted else save - 1), name
        skipped = f"skipping incomplete checkpoint {out / name / 'checkpoints' / f'epoch0000{save}.partial'}"
        assert (skipped in log) == (not counted), name
        assert_same_end(out / "full", out / name)
        # after the resumed run: every checkpoint complete, no leftover of the stopped save
        found = complete.scan(out / name / "checkpoints")
        assert sorted(f.folder.name for f in found) == ["epoch00001", "epoch00002", "final"], name
        assert all(f.complete and not f.legacy for f in found), name
        assert (out / name / "checkpoints" / "latest").read_text() == "final"


@pytest.mark.slow
def test_a_checkpoint_written_before_the_marker_still_resumes(killed):
    """The legacy run's epoch00001 (no marker, complete) is taken, its epoch00002 (DeepSpeed's files
    and ``latest``, nothing after) skipped, and the run ends as the uninterrupted one. Seen failing
    with the legacy rule removed (only markers count): exit 2, no complete checkpoint."""
    out, log = killed["out"], killed["log"]
    legacy = out / "legacy"
    assert resumed_at(log, legacy) == 1
    assert (
        f"skipping incomplete checkpoint {legacy / 'checkpoints' / 'epoch00002'} (policy.safetensors" in log
    )
    assert_same_end(out / "full", legacy)
    assert (legacy / "metrics.before_resume_epoch00001.jsonl").is_file()
    assert [json.loads(r)["epoch"] for r in (legacy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# --- the marker, the scan, rotation (no training) -------------------------------------------------


def fake_save(root: Path, tag: str, epoch: int, *, finish: bool = True) -> Path:
    """A checkpoint folder the way ``save_checkpoint`` makes one, with one stand-in file."""
    staged = root / f"{tag}.partial"
    staged.mkdir(parents=True)
    (staged / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\0" * 64)
    if finish:
        complete.seal(staged, tag=tag, epoch=epoch, rank=0, world=1)
        complete.publish(root, tag)
        return root / tag
    return staged


def test_rotation_counts_only_complete_checkpoints_and_keeps_the_newest_complete(tmp_path):
    """keep=1 with epoch00002 complete and, after it, epoch00003 cut short (as a kill leaves it, named as
    the old code named it): epoch00002 stays, the incomplete one goes. keep=0: the newest complete one
    still stays. Seen failing with the old rule (the newest ``keep`` folders named epoch*, nothing else
    removed): epoch00002 and epoch00003 removed, the incomplete epoch00004.partial kept."""
    root = tmp_path / "checkpoints"
    fake_save(root, "epoch00001", 1)
    fake_save(root, "epoch00002", 2)
    fake_save(root, "final", 2)
    (root / "epoch00003").mkdir()
    (root / "epoch00003" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\0")
    fake_save(root, "epoch00004", 4, finish=False)
    complete.prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch00002", "final"]
    root2 = tmp_path / "only_periodic" / "checkpoints"
    fake_save(root2, "epoch00001", 1)
    fake_save(root2, "epoch00002", 2)
    complete.prune(root2, keep=0)
    assert sorted(p.name for p in root2.iterdir() if p.is_dir()) == ["epoch00002"]


def test_a_checkpoint_counts_only_with_its_marker_and_every_listed_file_whole(tmp_path):
    root = tmp_path / "checkpoints"
    done = fake_save(root, "epoch00001", 1)
    assert [f.complete for f in complete.scan(root)] == [True]
    assert (root / "latest").read_text() == "epoch00001"
    (done / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\0" * 10)  # cut short after
    assert (
        complete.scan(root)[0].why
        == "zero_pp_rank_0_mp_rank_00_model_states.pt has 10 bytes, the marker says 64"
    )
    staged = fake_save(root, "epoch00002", 2, finish=False)
    (staged / complete.MARKER).write_text('{"format": "fastcps-checkpoint", "tag": "epo')  # a torn write
    assert [f.complete for f in complete.scan(root)] == [False, False]


def test_the_newest_complete_is_the_latest_epoch_and_any_marked_one_beats_a_legacy_one(tmp_path):
    root = tmp_path / "checkpoints"
    legacy = root / "epoch00009"  # no marker: complete by the old rule (its last file whole)
    legacy.mkdir(parents=True)
    (legacy / "mp_rank_00_model_states.pt").write_bytes(b"\0")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(legacy / "policy.safetensors"))
    fake_save(root, "epoch00002", 2)
    fake_save(root, "interrupted_epoch00003", 3)
    fake_save(root, "epoch00001", 1)
    found = complete.scan(root)
    assert [f.folder.name for f in found] == [
        "epoch00009",
        "epoch00001",
        "epoch00002",
        "interrupted_epoch00003",
    ]
    assert all(f.complete for f in found) and found[0].legacy
    assert complete.newest_complete(found).tag == "interrupted_epoch00003"
    with open(legacy / "policy.safetensors", "r+b") as f:  # a kill while it was written
        f.truncate(40)
    assert complete.scan(root)[0].why.startswith("policy.safetensors is missing or cut short")


# --- a run directory the ranks do not share ---------------------------------------------------------


@pytest.mark.slow
def test_ranks_that_do_not_share_the_run_directory_all_stop_at_start_up(tmp_path):
    """Two "nodes" on localhost, each with its own disk: rank r runs in tmp/node<r> with the relative
    output_dir ``runs``, so each resolves the run directory to its own folder. Both ranks exit 2 before
    any model loads, each with the message naming rank 1, its host and output_dir. Seen failing with the
    outcome decided per rank (rank 0 saw its own file and went on: exit 1 in its next collective, gloo's
    "Connection closed by peer"; NCCL would wait), and before the check (both ranks exit 0: rank 1 wrote
    its checkpoint files into its own folder, which no resume could put together)."""
    port, procs, logs = free_port(), [], []
    items = TINY + [
        "train.gradient_accumulation_steps=1",
        "output_dir=runs",
        "name=local",
        "train.num_epochs=1",
    ]
    try:
        t0 = time.monotonic()
        for rank in range(2):
            node = tmp_path / f"node{rank}"
            node.mkdir()
            env = child_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port))  # fmt: skip
            procs.append(
                start([sys.executable, "-m", "fastcps.train", "--config", CONFIG] + sets(items), env, node)
            )
        logs = [p.communicate(timeout=240)[0] for p in procs]
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            stop(p)
    assert [p.returncode for p in procs] == [2, 2], "\n".join(log[-2000:] for log in logs)
    for log in logs:
        assert "the run directory is not shared by all ranks" in log, log[-2000:]
        assert re.search(
            r"rank 1 on \S+ \(looked in " + re.escape(str(tmp_path / "node1" / "runs" / "local")), log
        )
        assert "output_dir" in log and "--set output_dir=/shared/runs" in log
        assert "epoch 1/" not in log and "auto: ZeRO stage" not in log  # stopped before the model
    assert (tmp_path / "node0" / "runs" / "local").is_dir() and not (tmp_path / "node1" / "runs").exists()
    assert not list((tmp_path / "node0" / "runs" / "local").glob(".shared-check-*"))  # cleaned up
    assert elapsed < 200
