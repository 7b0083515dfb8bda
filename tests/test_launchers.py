"""Every launcher (issue 25, point 1): from the variables each launcher sets, exactly as it sets them
(deepspeed 0.19.8's launcher/launch.py, multinode_runner.py, launcher_helper.py; torch 2.14's
elastic agent; Open MPI, MPICH/Intel MPI hydra, MVAPICH; Slurm's src/common/env.c), each process's
global rank, local rank, world size and rendezvous; the sbatch-without-srun and no-launcher cases and
the errors. Then real runs of the digits toy: two processes started as srun starts them form one world
of 2, and a two-node torchrun (static rendezvous, one process per node) ends bit for bit where one
node with two processes (torchrun --standalone: c10d rendezvous, the agent's store) ends.
"""

import json
import socket
import sys
from pathlib import Path

import pytest

from fastcps.checkpoint import ExportedWeights
from fastcps.distributed import launchers
from fastcps.distributed.launchers import LaunchError, discover, expand_hostlist, first_host, slurm_port
from multi_run import DIGITS_CONFIG, Processes, ROOT, TINY_DIGITS, child_env, free_port

HOST = {"HOSTNAME": "gpu01", "PATH": "/usr/bin", "HOME": "/home/u"}  # what every environment has


def found(env, mpi4py=False):
    launch = discover({**HOST, **env}, mpi4py=lambda: mpi4py)
    return launch.rank, launch.local_rank, launch.world, launch.master_addr, launch.master_port


# --- what each launcher sets ---------------------------------------------------------------------


def test_deepspeed_pdsh_launch_py():
    """deepspeed --hostfile hosts --num_nodes 2: pdsh runs deepspeed/launcher/launch.py on each node,
    which sets torch's variables (+ CROSS_RANK, CROSS_SIZE, LOCAL_SIZE)."""
    env = {
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "16",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "LOCAL_SIZE": "8",
        "RANK": "11",
        "LOCAL_RANK": "3",
        "PDSH_RCMD_TYPE": "ssh",
    }
    assert found(env) == (11, 3, 16, "10.0.0.1", 29500)
    assert discover(env).launcher == "deepspeed"


def test_torchrun_static_and_c10d():
    env = {
        "RANK": "5",
        "GROUP_RANK": "1",
        "ROLE_RANK": "5",
        "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": "4",
        "WORLD_SIZE": "8",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_WORLD_SIZE": "8",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "LOCAL_RANK": "1",
    }
    assert found(env) == (5, 1, 8, "node0", 29400)
    c10d = {**env, "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job7"}
    assert found(c10d) == (5, 1, 8, "node0", 29400)
    assert discover(c10d).launcher == "torchrun" and "torchrun's agent" in discover(c10d).describe()


OPEN_MPI = {  # mpirun -n 8 (and deepspeed --launcher openmpi: the same, plus -x exports, UCX_TLS=tcp)
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_UNIVERSE_SIZE": "8",
    "UCX_TLS": "tcp",
}


def test_open_mpi_with_exported_rendezvous():
    env = {**OPEN_MPI, "MASTER_ADDR": "gpu01", "MASTER_PORT": "29501"}
    assert found(env) == (5, 1, 8, "gpu01", 29501)
    assert found({**OPEN_MPI, "MASTER_ADDR": "gpu01"})[4] == 29500  # DeepSpeed's default port


def test_open_mpi_without_master_addr_uses_deepspeeds_mpi_discovery_or_says_what_to_do():
    """The issue's case: OMPI_COMM_WORLD_RANK=5 / SIZE=8 used to become RANK 0 of a world of 1."""
    launch = discover(OPEN_MPI, mpi4py=lambda: True)
    assert (launch.rank, launch.local_rank, launch.world, launch.mpi_discovery) == (5, 1, 8, True)
    with pytest.raises(LaunchError) as err:
        discover(OPEN_MPI, mpi4py=lambda: False)
    msg = str(err.value)
    assert "OMPI_COMM_WORLD_RANK=5" in msg and "pip install mpi4py" in msg
    assert "mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500" in msg and ".deepspeed_env" in msg


def test_apply_runs_deepspeeds_mpi_discovery_and_checks_it(monkeypatch):
    import deepspeed.comm.comm as ds_comm

    env = {}

    def mpi_discovery(distributed_port, verbose):
        env.update(
            RANK="5",
            WORLD_SIZE="8",
            LOCAL_RANK="1",
            MASTER_ADDR="10.0.0.1",
            MASTER_PORT=str(distributed_port),
        )

    monkeypatch.setattr(ds_comm, "mpi_discovery", mpi_discovery)
    launchers.apply(discover(OPEN_MPI, mpi4py=lambda: True), env)
    assert env["MASTER_PORT"] == "29500" and env["RANK"] == "5"
    monkeypatch.setattr(ds_comm, "mpi_discovery", lambda **kw: env.update(RANK="0", WORLD_SIZE="1"))
    with pytest.raises(LaunchError, match="mpi4py says rank 0 of 1"):
        launchers.apply(discover(OPEN_MPI, mpi4py=lambda: True), env)


def test_mpich_and_intel_mpi_hydra_and_mvapich():
    hydra = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "PMI_FD": "7", "MPI_LOCALNRANKS": "2"}
    assert found({**hydra, "MASTER_ADDR": "n0"}) == (3, 1, 4, "n0", 29500)
    with pytest.raises(LaunchError, match="-genv MASTER_ADDR <first host> -genv MASTER_PORT 29500"):
        discover(hydra, mpi4py=lambda: False)
    mv2 = {"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "0"}
    assert found({**mv2, "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}) == (2, 0, 4, "n0", 1234)


def test_deepspeed_mpich_and_impi_launchers():
    """--launcher mpich: -genv MASTER_ADDR/PORT/WORLD_SIZE/LOCAL_SIZE, launcher_helper.py maps PMI_RANK ->
    RANK and MPI_LOCALRANKID -> LOCAL_RANK; --launcher impi: -env RANK/LOCAL_RANK per process."""
    mpich = {
        "PMI_RANK": "6",
        "PMI_SIZE": "8",
        "MPI_LOCALRANKID": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "8",
        "LOCAL_SIZE": "4",
        "RANK": "6",
        "LOCAL_RANK": "2",
    }
    assert found(mpich) == (6, 2, 8, "10.0.0.1", 29500)
    impi = {**mpich, "I_MPI_PIN": "0"}
    assert found(impi) == (6, 2, 8, "10.0.0.1", 29500)


SRUN = {  # srun -N 2 --ntasks-per-node 4 inside sbatch: a step's environment (env_array_for_step + task)
    "SLURM_JOB_ID": "4812345",
    "SLURM_JOBID": "4812345",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "8",
    "SLURM_NPROCS": "8",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_PROCID": "6",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
}


def test_srun_derives_the_rendezvous_from_the_nodelist_and_job_id():
    """MASTER_ADDR: the step's first host; MASTER_PORT: 15000 + the job id's last 4 digits (Lightning's)."""
    assert found(SRUN) == (6, 2, 8, "gpu01", 15000 + 2345)
    launch = discover(SRUN)
    assert launch.launcher == "Slurm srun" and "first host of SLURM_STEP_NODELIST" in launch.describe()


def test_srun_in_an_sbatch_script_that_exports_the_rendezvous():
    """The issue's repro: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and an exported MASTER_ADDR/PORT,
    no RANK / WORLD_SIZE: every task used to become rank 0 of a world of one."""
    env = {**SRUN, "MASTER_ADDR": "10.1.0.1", "MASTER_PORT": "29555"}
    assert [found({**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4)})[:3] for r in (0, 5)] == [
        (0, 0, 8),
        (5, 1, 8),
    ]
    assert found(env)[3:] == ("10.1.0.1", 29555)


def test_deepspeed_slurm_launcher_exports_only_slurm_variables():
    env = {**SRUN, "PYTHONPATH": "/x", "UCX_TLS": "tcp"}  # srun --export=ALL,<EXPORT_ENVS>
    assert found(env) == (6, 2, 8, "gpu01", 17345)


def test_torchrun_under_srun_takes_torchs_variables():
    """One torchrun per node started by srun: the step has 2 tasks, torchrun's workers know better."""
    env = {**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    env.update(RANK="9", LOCAL_RANK="1", WORLD_SIZE="16", MASTER_ADDR="gpu01", MASTER_PORT="29400")
    env.update(TORCHELASTIC_RUN_ID="j", LOCAL_WORLD_SIZE="8")
    assert found(env) == (9, 1, 16, "gpu01", 29400)


def test_sbatch_without_srun_is_a_world_of_one():
    """A plain `python -m fastcps.train` line of an sbatch script: SLURM_PROCID=0 and SLURM_NTASKS=8 come
    from the batch step (env_array_for_batch_job), no SLURM_STEP_NUM_TASKS: nobody else will come."""
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0", ENVIRONMENT="BATCH")
    rank, local, world, addr, port = found(batch)
    assert (rank, local, world, addr) == (0, 0, 1, "127.0.0.1") and port > 0
    assert "not started by srun" in discover(batch).describe()


def test_no_launcher_is_a_world_of_one():
    rank, local, world, addr, port = found({})
    assert (rank, local, world, addr) == (0, 0, 1, "127.0.0.1")
    with socket.socket() as s:  # a free port: nobody listens there
        s.bind(("127.0.0.1", port))
    assert found({"MASTER_PORT": "4321"})[4] == 4321
    assert discover({}).describe().startswith("launcher: none")


def test_a_one_task_step_meets_itself_on_a_free_local_port():
    """Two single-task steps of one job on a node (srun -n1 ... &) would both derive the job's port."""
    one = {**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    rank, local, world, addr, port = found(one)
    assert (rank, world, addr) == (0, 1, "127.0.0.1") and port != 17345


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, match",
    [
        (
            {"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a"},
            "RANK=3 does not fit WORLD_SIZE=2",
        ),
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set but RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "export LOCAL_RANK"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR .* is not set"),
        ({**SRUN, "SLURM_STEP_NODELIST": "gpu[01-"}, "unbalanced brackets"),
        ({**SRUN, "SLURM_LOCALID": None}, "SLURM_LOCALID"),
        ({**SRUN, "SLURM_JOB_ID": "abc"}, "no digits to derive MASTER_PORT"),
    ],
)
def test_errors_name_the_variables_and_the_fix(env, match):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(LaunchError, match=match):
        discover(env, mpi4py=lambda: False)


def test_hostlists():
    assert expand_hostlist("gpu[01-04,07],cpu3") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
    assert first_host("gpu[01-04,07],cpu3") == "gpu01"
    assert expand_hostlist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert expand_hostlist("node7") == ["node7"] and first_host("a-b[3],c") == "a-b3"
    for bad in ("gpu[2-1]", "gpu[a-b]", "gpu]", ""):
        with pytest.raises(LaunchError):
            expand_hostlist(bad)
    assert slurm_port("4812345") == 17345 and slurm_port("12") == 15012 and slurm_port("99_3") == 15993


# --- real runs ---------------------------------------------------------------------------------------

CONFIG = DIGITS_CONFIG
TINY = TINY_DIGITS + ["train.num_epochs=2"]
SCRIPT = str(ROOT / "tests" / "multi_run.py")


def args(out: Path, name: str) -> list[str]:
    return ["--config", CONFIG] + [
        a for kv in TINY + [f"output_dir={out}", f"name={name}"] for a in ("--set", kv)
    ]


def run_all(commands, timeout: float = 400) -> list[str]:
    with Processes(commands) as ps:
        codes = ps.wait(timeout)
        logs = [ps.log(i) for i in range(len(commands))]
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited {code}:\n" + logs[i][-5000:]
    return logs


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two-epoch run three ways: torchrun --standalone with two processes (the reference),
    torchrun on two "nodes" of one process each (static rendezvous; both have LOCAL_RANK 0), and two
    processes started with only the variables srun sets (+ the MASTER_ADDR/PORT an sbatch script
    exports)."""
    out = tmp_path_factory.mktemp("launchers")
    logs = {}
    logs["one_node"] = run_all(
        [(torchrun("--standalone", "--nproc-per-node", "2", SCRIPT) + args(out, "one_node"), child_env())]
    )
    port = free_port()
    static = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]
    logs["two_nodes"] = run_all(
        [
            (torchrun(*static, "--node-rank", str(i), SCRIPT) + args(out, "two_nodes"), child_env())
            for i in (0, 1)
        ]
    )
    slurm = {k: v for k, v in SRUN.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")}
    slurm.update(SLURM_NTASKS="2", SLURM_NPROCS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1")
    slurm.update(SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost")
    slurm.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    logs["srun"] = run_all(
        [
            (
                [sys.executable, SCRIPT] + args(out, "srun"),
                child_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0"),
            )
            for r in (0, 1)
        ]
    )
    return out, logs


def numbers(run_dir: Path) -> list[dict]:
    """What a run logged, without its timings (time/, perf/, memory/ differ between any two runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "memory/"))} for r in rows]


@pytest.mark.slow
def test_srun_style_processes_form_one_world_of_two(runs):
    out, logs = runs
    rank0 = next(log for log in logs["srun"] if "launcher:" in log)
    assert (
        "launcher: Slurm srun (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS): a world of 2 processes"
        in rank0
    )
    assert sum("launcher:" in log for log in logs["srun"]) == 1  # one line, on rank 0
    assert [r["epoch"] for r in numbers(out / "srun")] == [1, 2]
    # rank 1 held its own ZeRO-3 partition: both ranks were in one world
    assert list((out / "srun" / "checkpoints" / "final").glob("*zero_pp_rank_1_*"))


@pytest.mark.slow
def final_weights(run_dir: Path) -> dict:
    """The exported weights of the run's final checkpoint (full fine-tuning: the sharded transformer/)."""
    exported = ExportedWeights(run_dir / "checkpoints" / "final")
    return {k: exported.get(k) for k in exported.keys()}


def test_two_nodes_end_bit_for_bit_where_one_node_ends(runs):
    out, logs = runs
    assert (
        "launcher: torchrun (RANK, LOCAL_RANK, WORLD_SIZE; the store: torchrun's agent's)"
        in logs["one_node"][0]
    )
    assert any(
        "launcher: torchrun (RANK, LOCAL_RANK, WORLD_SIZE; the store: torchrun's agent's): a world of 2"
        in log
        for log in logs["two_nodes"]
    )
    ref = final_weights(out / "one_node")
    assert ref
    for name in ("two_nodes", "srun"):
        got = final_weights(out / name)
        assert got.keys() == ref.keys()
        worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        assert worst == 0.0, f"{name}: final weights differ from one node's by up to {worst:.3g}"
        assert numbers(out / name) == numbers(out / "one_node"), name
