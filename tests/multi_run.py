"""Run ``fastcps.train.main`` on several argument lists, one after the other, in this process:
``python tests/multi_run.py [--dump DIR] ARGS... --next ARGS...``. Started once per rank (RANK /
WORLD_SIZE / MASTER_* in the environment, no launcher; ``launch`` below does that), it runs several
trainings for the interpreter and DeepSpeed start-up of one (most of a tiny run's cost). Exits with
the first non-zero code. ``--reward NAME=module:Class`` registers a test reward (a module of tests/,
e.g. ``tiny_rewards:ScriptedReward``). ``--dump DIR``: record what every training micro-step is fed
(``wiring_support.UpdateDump``) to ``DIR/run<k>.rank<r>.pt``. ``--probe DIR``: record how ZeRO-3 holds
each parameter of the trained module (``wiring_support.PartitionProbe``) to ``DIR/run<k>.rank<r>.json``.
``--writes DIR``: record the files every checkpoint save writes (``checkpoint_support.CheckpointWrites``) to
``DIR/run<k>.rank<r>.json``; ``--fault K:S:J`` (with ``--writes``, repeatable): in run K, stop the s-th
save right after its j-th file with ``checkpoint_support.InjectedFault``, as a kill would; the script then
goes on with run K+1 (the resume, say) in the same interpreter.

``launch(runs, world)`` starts the ranks on a free port with a clean environment, waits with a
timeout, and kills whatever is still running on the way out (a failing or hanging test leaves no
process behind)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The launcher's variables: a child must not inherit the test process's own rendezvous (an in-process
# ``main()`` leaves them behind when a test forgets to clean up).
# The digits toy at its smallest, for multi-process runs: 2 prompts x 4 images, 4 sampling steps, one
# rollout batch and minibatch of 4 per rank, no eval, no logs or images, only the final checkpoint.
DIGITS_CONFIG = str(ROOT / "configs" / "digits_cps.json")
TINY_DIGITS = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=4",
    "train.rollout_batch_size=4",
    "train.minibatch_size=4",
    "eval.every=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.images_every=0",
    "checkpoint.every=0",
    f"deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}",
]
RENDEZVOUS = ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it): no fixed port that a parallel run could hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict[str, str]:
    """The test process's environment without its rendezvous, on DeepSpeed's CPU accelerator, with one
    OpenMP thread: on 2 shared cores a tiny run's epoch took 14 s with torch's default of 2 threads and
    0.9 s with 1 (two threads of one process wait on each other when another process holds a core)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    # `python tests/multi_run.py` puts tests/, not the checkout, first on sys.path: without this a child
    # imported whichever fastcps is installed (another checkout's, when installed editable from there)
    path = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return {
        **env,
        "PYTHONPATH": path,
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and what it started (it leads its own session: ``start_new_session=True``), and
    reap it. A launcher's rank processes go with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def start(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """``cmd`` in its own session (``stop`` kills it whole), output (stdout and stderr) piped as text."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_command(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end (``timeout`` seconds at most); nothing it started outlives the call."""
    proc = start(cmd, env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


class Processes:
    """Commands started together, each in its own session (``start``), their output (stdout and stderr)
    read on threads as it comes (``log(i)``), the time each exited (``exited_at``). A ``with`` block
    kills (``stop``) whatever is still running on the way out: no test leaves a process behind."""

    def __init__(self, commands: list[tuple[list[str], dict[str, str]]]):
        self.procs = [start(cmd, env) for cmd, env in commands]
        self.lines: list[list[str]] = [[] for _ in self.procs]
        self.exited_at: list[float | None] = [None for _ in self.procs]
        self.readers = [
            threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(self.procs))
        ]
        for r in self.readers:
            r.start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            self.lines[i].append(line)
        self.procs[i].wait()
        self.exited_at[i] = time.monotonic()

    def log(self, i: int) -> str:
        return "".join(self.lines[i])

    def wait(self, timeout: float, which=None) -> list[int | None]:
        """Wait until the processes ``which`` (all) have exited, ``timeout`` seconds at most; their
        return codes (None: still running)."""
        which = range(len(self.procs)) if which is None else which
        deadline = time.monotonic() + timeout
        for i in which:
            self.readers[i].join(timeout=max(0.0, deadline - time.monotonic()))
        return [self.procs[i].poll() if self.exited_at[i] is not None else None for i in which]

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            stop(p)
        for r in self.readers:
            r.join(timeout=10)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> float:
    """Poll ``predicate`` until true (then the monotonic time), AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll)
    return time.monotonic()


def launch(
    runs: list[list[str]],
    world: int,
    *,
    dump: Path | None = None,
    probe: Path | None = None,
    writes: Path | None = None,
    faults: dict[int, tuple[int, int]] | None = None,
    timeout: float = 500,
) -> list[str]:
    """Run the argument lists ``runs`` one after the other in ``world`` rank processes; returns each
    rank's output. Fails (AssertionError with the logs) when a rank exits non-zero. ``writes`` /
    ``faults``: see ``--writes`` / ``--fault`` above."""
    args = (["--dump", str(dump)] if dump is not None else []) + (
        ["--probe", str(probe)] if probe is not None else []
    )
    args += ["--writes", str(writes)] if writes is not None else []
    for k, (save, j) in (faults or {}).items():
        args += ["--fault", f"{k}:{save}:{j}"]
    for i, run in enumerate(runs):
        args += (["--next"] if i else []) + run
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            env = child_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            procs.append(start([sys.executable, str(Path(__file__).resolve())] + args, env))
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n" + logs[rank][-4000:]
    return logs


def _main(argv: list[str]) -> int:
    from fastcps.train import main

    from checkpoint_support import CheckpointWrites, InjectedFault
    from wiring_support import PartitionProbe, UpdateDump

    recorders, writes, faults = [], None, {}  # tests/ is this script's folder: wiring_support is on sys.path
    while argv[:1] in (["--dump"], ["--probe"], ["--writes"], ["--fault"], ["--reward"]):
        if argv[0] == "--reward":  # NAME=module:Class, e.g. scripted=tiny_rewards:ScriptedReward
            from fastcps.rewards import register

            register(*argv[1].split("=", 1))
            argv = argv[2:]
            continue
        if argv[0] == "--dump":
            recorders.append(UpdateDump(Path(argv[1])))
        elif argv[0] == "--probe":
            recorders.append(PartitionProbe(Path(argv[1])))
        elif argv[0] == "--writes":
            writes = Path(argv[1])
        else:
            k, save, j = (int(x) for x in argv[1].split(":"))
            faults[k] = (save, j)
        argv = argv[2:]
    if writes is not None:
        recorders.append(CheckpointWrites(writes, faults))
    runs, cur = [], []
    for a in argv:
        if a == "--next":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)
    for k, args in enumerate(runs):
        for r in recorders:
            r.start(k)
        try:
            rc = main(args)
        except InjectedFault as fault:  # the run stops here, as a kill would stop it; go on with the next
            print(f"[multi_run] run {k}: {fault}", flush=True)
            rc = 0
        for r in recorders:
            r.save()
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
