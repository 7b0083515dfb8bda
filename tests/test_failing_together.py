"""Failing together (issue 25, point 2): an error on one rank ends every rank within seconds, each
saying which rank failed (global rank, host) and why, with that rank's exit code; a rank that
vanishes (SIGKILL) ends the others within the heartbeat timeout; a rank alive but stuck makes the
others' collective time out after ``distributed.step_timeout_s`` and all end.

First the channel itself (``fastcps.distributed.failure.FailureChannel``) on a real TCPStore in this
process, its exits recorded instead of taken; then real two-rank runs of the digits toy whose reward
is scripted per rank (tests/tiny_rewards.py ``ScriptedReward``), placed where the backend cannot notice
anything (a rank waiting on its own reward is in no collective): what ends them is the channel.
"""

import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from fastcps.distributed import Exit, Failure, FailureChannel, symptom
from multi_run import DIGITS_CONFIG, Processes, ROOT, TINY_DIGITS, child_env, free_port, wait_for

# --- the channel, in-process ------------------------------------------------------------------------


class Exits:
    """Records the exit codes a channel would have ended its process with."""

    def __init__(self):
        self.codes, self.event = [], threading.Event()

    def __call__(self, code):
        self.codes.append(int(code))
        self.event.set()


def server(port: int):
    return tdist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)


def client(port: int):
    return tdist.TCPStore(
        "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=10)
    )


def channel(store, rank, world=2, hb=2.0):
    """Rank ``rank``'s channel on ``store``, beating every 0.1 s, its exits recorded."""
    exits = Exits()
    ch = FailureChannel(
        store,
        rank,
        world,
        heartbeat_timeout_s=hb,
        poll_s=0.1,
        host=f"host{rank}",
        exit_fn=exits,
        generation=0,
    )
    return ch, exits


def test_a_failure_reaches_the_other_rank_with_its_code_and_cause(capsys):
    port = free_port()
    store = server(port)
    (c0, e0), (c1, e1) = channel(store, 0), channel(client(port), 1)
    c0.start(), c1.start()
    t0 = time.monotonic()
    c1.fail(Exit.REWARD, "reward 'x' raised RuntimeError: scorer down")  # waits for rank 0's acknowledgement
    assert e0.event.wait(5) and e0.codes == [3] and e1.codes == [3]
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert (
        "stopped: rank 1 (host1) failed: reward 'x' raised RuntimeError: scorer down (exit 3); ending rank 0"
        in err
    )


def test_a_silent_rank_is_reported_vanished_by_its_neighbour(capsys):
    port = free_port()
    store = server(port)  # (a clone does not keep the server alive)
    (c0, e0), (c1, _) = channel(store, 0), channel(client(port), 1)
    c0.start(), c1.start()
    time.sleep(0.5)
    c1._stop.set()  # rank 1's heartbeat stops, as when the OOM killer takes it
    t0 = time.monotonic()
    assert e0.event.wait(10) and e0.codes == [Exit.PEER_VANISHED]
    assert 1.5 < time.monotonic() - t0 < 6  # heartbeat_timeout_s = 2
    assert "stopped: rank 1 (host1) failed: vanished: no heartbeat for 2 s" in capsys.readouterr().err


def test_losing_the_store_ends_the_rank(capsys):
    """The store's host (rank 0's process under env://) died: the others end with exit 5."""
    port = free_port()
    host = subprocess.Popen(
        [sys.executable, "-c", f"import torch.distributed as d, time; s = d.TCPStore('127.0.0.1', {port}, "
         "is_master=True, wait_for_workers=False); print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert host.stdout.readline().strip() == "up"
        c1, e1 = channel(client(port), 1)
        c1.start()
        time.sleep(0.3)
        host.kill()
        assert e1.event.wait(10) and e1.codes == [Exit.PEER_VANISHED]
    finally:
        host.kill()
        host.wait(10)
    assert "stopped: lost the rendezvous store" in capsys.readouterr().err


def test_an_echo_of_a_peers_failure_reports_the_cause(capsys):
    """Rank 0's collective failed because rank 1 went away after publishing its error: rank 0 reports
    rank 1's error and code, not the connection it lost."""
    port = free_port()
    store = server(port)  # (a clone does not keep the server alive)
    (c0, e0), (c1, _) = channel(store, 0), channel(client(port), 1)
    c1._publish(Failure(rank=1, host="host1", code=4, message="nan", reporter=1))
    c0.fail(Exit.PEER_VANISHED, "lost a peer (Connection closed by peer)", symptom_of_peer=True)
    assert e0.codes == [4] and "rank 1 (host1) failed: nan (exit 4)" in capsys.readouterr().err


def test_a_good_end_raises_no_alarm_and_rank_0_waits_for_the_others():
    port = free_port()
    store = server(port)
    (c0, e0), (c1, e1) = channel(store, 0), channel(client(port), 1)
    c0.start(), c1.start()
    closing = threading.Thread(target=c0.close, kwargs={"wait_s": 20})
    closing.start()
    time.sleep(1.0)
    assert closing.is_alive()  # rank 1 has not closed: rank 0 (the store's host) stays
    c1.close(wait_s=20)
    closing.join(5)
    assert not closing.is_alive() and e0.codes == e1.codes == []
    time.sleep(0.5)  # no watchdog left to raise an alarm
    assert e0.codes == e1.codes == []


def test_rank_0_waiting_at_the_end_notices_a_rank_that_vanished():
    port = free_port()
    store = server(port)  # (a clone does not keep the server alive)
    (c0, e0), (c1, _) = channel(store, 0), channel(client(port), 1)
    c0.start(), c1.start()
    c1._stop.set()  # rank 1 dies before its end
    t0 = time.monotonic()
    c0.close(wait_s=60)
    assert e0.codes == [Exit.PEER_VANISHED] and time.monotonic() - t0 < 10


def test_symptoms_of_a_peers_trouble():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/"
    assert symptom(RuntimeError(gloo + "pair.cc:561] Connection closed by peer [127.0.0.1]:1927")) == 5
    assert symptom(RuntimeError(gloo + "unbound_buffer.cc:78] Timed out waiting 4000ms for recv")) == 6
    assert symptom(tdist.DistBackendError("NCCL Watchdog caught collective operation timeout")) == 6
    assert symptom(tdist.DistNetworkError("Connection reset by peer")) == 5
    assert symptom(RuntimeError("HTTPSConnectionPool: Read timed out")) is None  # not a collective's
    assert symptom(torch.OutOfMemoryError("CUDA out of memory")) is None


# --- real runs: two ranks of the digits toy ------------------------------------------------------

CONFIG = DIGITS_CONFIG
TINY = TINY_DIGITS + ["train.num_epochs=3"]


def two_ranks(out: Path, reward_args: str, extra=(), rank_extra=None) -> Processes:
    """Two rank processes (plain RANK/WORLD_SIZE variables) training with the scripted reward;
    ``rank_extra``: rank -> overrides for that rank only."""
    sets = TINY + [f"output_dir={out}", f'rewards=[{{"name": "scripted", "args": {reward_args}}}]', *extra]
    port = free_port()
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    commands = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            str(ROOT / "tests" / "multi_run.py"),
            "--reward",
            "scripted=tiny_rewards:ScriptedReward",
        ]
        mine = sets + (rank_extra or {}).get(rank, [])
        cmd += ["--config", CONFIG] + [a for kv in mine for a in ("--set", kv)]
        commands.append((cmd, child_env(**env, RANK=str(rank), LOCAL_RANK=str(rank))))
    return Processes(commands)


def reached(ps: Processes, marker: Path, what: str, timeout: float = 300) -> None:
    """Wait until ``marker`` exists (a rank reached that reward call); fail at once if a rank exited."""
    wait_for(lambda: marker.exists() or any(c is not None for c in ps.wait(0)), timeout, what)
    assert marker.exists(), f"a rank exited before {what}:\n" + ps.log(0)[-3000:] + ps.log(1)[-3000:]


def reward_args(markers: Path, **script) -> str:
    import json

    return json.dumps({"marker_dir": str(markers), **script})


@pytest.mark.slow
def test_a_reward_raising_on_one_rank_ends_both_with_its_code_and_message(tmp_path):
    """Rank 1's reward raises; rank 0 sleeps in its own reward (10 min), where no collective can notice
    rank 1's end: the channel ends it, with exit 3 and rank 1's message in ITS log."""
    markers = tmp_path / "markers"
    markers.mkdir()
    script = reward_args(markers, raise_on=[1], sleep_on={"0": 600})
    with two_ranks(tmp_path, script) as ps:
        reached(ps, markers / "rank0.call0", "rank 0's first reward call")
        assert ps.wait(300, which=[1]) == [3], ps.log(1)[-4000:]
        assert ps.wait(60, which=[0]) == [3], ps.log(0)[-4000:]
        took = ps.exited_at[0] - ps.exited_at[1]
        log0, log1 = ps.log(0), ps.log(1)
    assert "[fastcps] stopped: reward 'scripted' raised RuntimeError: scripted failure on rank 1" in log1
    assert "stopped: rank 1 (" in log0 and "scripted failure on rank 1 (exit 3); ending rank 0" in log0
    assert took < 30, f"rank 0 ended {took:.1f} s after rank 1"


@pytest.mark.slow
def test_a_killed_rank_ends_the_other_within_the_heartbeat_timeout(tmp_path):
    """Rank 1 is SIGKILLed in its rollout's reward while rank 0 waits on its own (no collective):
    heartbeat_timeout_s = 5 -> rank 0 ends with exit 5 naming rank 1."""
    markers = tmp_path / "markers"
    markers.mkdir()
    script = reward_args(markers, sleep_on={"0": 600, "1": 600})
    with two_ranks(tmp_path, script, ["distributed.heartbeat_timeout_s=5"]) as ps:
        reached(ps, markers / "rank1.call0", "rank 1's first reward")
        ps.procs[1].kill()
        killed = time.monotonic()
        assert ps.wait(60, which=[0]) == [Exit.PEER_VANISHED], ps.log(0)[-4000:]
        took = ps.exited_at[0] - killed
        log0 = ps.log(0)
    assert "stopped: rank 1 (" in log0 and "vanished: no heartbeat for" in log0, log0[-3000:]
    assert took < 40, f"rank 0 ended {took:.1f} s after rank 1 was killed"


@pytest.mark.slow
def test_a_stuck_rank_times_out_the_others_collective_and_both_end(tmp_path):
    """Rank 1 sleeps in its second epoch's reward (alive: it keeps beating); rank 0 reaches the epoch's
    advantage all-gather and waits there: after step_timeout_s (10 s, set after the first epoch) its
    collective times out, it says so, and both end with exit 6."""
    markers = tmp_path / "markers"
    markers.mkdir()
    script = reward_args(markers, sleep_on={"1": 300}, from_call=1)
    extra = ["distributed.step_timeout_s=10", "distributed.heartbeat_timeout_s=5"]
    with two_ranks(tmp_path, script, extra) as ps:
        reached(ps, markers / "rank1.call1", "rank 1's second reward")
        stuck = time.monotonic()
        assert ps.wait(120) == [Exit.COLLECTIVE_TIMEOUT] * 2, ps.log(0)[-4000:] + ps.log(1)[-4000:]
        took = max(ps.exited_at) - stuck
        log0, log1 = ps.log(0), ps.log(1)
    assert "a collective timed out after 10 s (distributed.step_timeout_s in the training loop" in log0
    assert "stopped: rank 0 (" in log1 and "a collective timed out after 10 s" in log1
    assert 10 <= took < 60, f"both ended {took:.1f} s after rank 1 got stuck"


@pytest.mark.slow
def test_a_file_missing_on_one_node_ends_both_with_exit_2(tmp_path):
    """Rank 1's weights file is missing (its node lacks it): it fails while building its policy, rank 0
    waits in DeepSpeed's start-up collectives (under the 30 min loading timeout): the channel ends it,
    with exit 2 and the missing path in ITS log."""
    markers = tmp_path / "markers"
    markers.mkdir()
    missing = {1: ["policy.pretrained=/no/such/weights.safetensors"]}
    with two_ranks(tmp_path, reward_args(markers), rank_extra=missing) as ps:
        codes = ps.wait(300)
        log0 = ps.log(0)
    assert codes == [2, 2], log0[-3000:]
    assert "stopped: rank 1 (" in log0 and "/no/such/weights.safetensors" in log0 and "(exit 2)" in log0
    assert not list(markers.iterdir())  # nobody got as far as a reward


def test_checkpoint_saves_run_under_the_loading_timeout(monkeypatch):
    """Trainer.save_checkpoint runs under distributed.load_timeout_s (rank 0 writes while the others
    wait) and the training loop's timeout is back after it; a world of one over gloo."""
    import importlib

    from fastcps import distributed as fdist
    from fastcps.config import RunConfig
    from fastcps.trainer import Trainer

    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    fdist.init(timeout_s=1800)
    fdist.set_collective_timeout(300)
    seen = []
    monkeypatch.setattr(
        "fastcps.trainer.ckpt.save_checkpoint", lambda *a, **kw: seen.append(fdist.current_timeout_s())
    )
    cfg = RunConfig.model_validate({"distributed": {"load_timeout_s": 1234, "step_timeout_s": 300}})
    stub = type(
        "T",
        (),
        {"cfg": cfg, "engine": None, "run_dir": None, "ema": None, "epoch": 3, "state_dict": lambda self: {}},
    )()
    stub.policy = type("P", (), {"lora": None})()
    Trainer.save_checkpoint(stub, "final")
    assert seen == [1234] and fdist.current_timeout_s() == 300
