"""Which launcher started this process, and what it says about the world: global rank, local rank,
world size and the rendezvous address (``MASTER_ADDR:MASTER_PORT``), read from the variables that
launcher sets. ``discover(env)`` is pure (tests feed it each launcher's environment as a dict);
``apply`` writes the result into ``os.environ`` for ``torch.distributed``'s ``env://`` rendezvous.

What each launcher sets (checked in their sources, deepspeed 0.19.8, torch 2.14, Slurm's
src/common/env.c):

- torch's variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``:
  ``torchrun`` (static and c10d rendezvous; c10d: the address of the agent's store), ``deepspeed``
  with its default pdsh launcher (``deepspeed/launcher/launch.py``), ``deepspeed --launcher mpich``
  (``launcher_helper.py`` maps PMI ranks to RANK/LOCAL_RANK, ``-genv`` the rest) and ``--launcher impi``.
- Open MPI's ``mpirun`` (also ``deepspeed --launcher openmpi``, which exports no MASTER_ADDR and
  relies on DeepSpeed's ``mpi_discovery`` through mpi4py): ``OMPI_COMM_WORLD_RANK / _SIZE /
  _LOCAL_RANK``. MPICH / Intel MPI hydra: ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``. MVAPICH:
  ``MV2_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK``.
- Slurm's ``srun`` (also ``deepspeed --launcher slurm``, which exports only SLURM_* variables):
  ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``,
  ``SLURM_JOB_ID``. ``SLURM_STEP_NUM_TASKS`` is the marker of "started by srun": only a job step's
  environment has it (``env_array_for_step``), while a batch script's (``env_array_for_batch_job``)
  has ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` = the job's task count, so a plain ``python`` inside
  ``sbatch`` must not take ``SLURM_NTASKS`` for its world.

Precedence: torch's variables (a launcher that set them knows best, e.g. ``torchrun`` under ``srun``),
then MPI's (``mpirun`` inside an sbatch script inherits the batch script's SLURM_* variables), then
Slurm's. None of them: a world of one, as a plain ``python -m fastcps.train`` always was.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Mapping

# torch's (and DeepSpeed's: comm/constants.py TORCH_DISTRIBUTED_DEFAULT_PORT) default rendezvous port
DEFAULT_PORT = 29500
TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The launcher's variables do not say who this process is, or contradict each other; the message
    names the variables and what to export."""


@dataclass(frozen=True)
class Launch:
    """What the launcher said. ``master_addr`` None: DeepSpeed's ``mpi_discovery`` finds it (mpi4py)."""

    launcher: str
    rank: int
    local_rank: int
    world: int
    master_addr: str | None
    master_port: int
    source: str  # where the numbers came from, for the log line

    @property
    def mpi_discovery(self) -> bool:
        return self.master_addr is None

    def describe(self) -> str:
        where = (
            f"rank 0's address from DeepSpeed's mpi_discovery (mpi4py), port {self.master_port}"
            if self.mpi_discovery
            else f"{self.master_addr}:{self.master_port}"
        )
        n = "one process" if self.world == 1 else f"{self.world} processes"
        return f"launcher: {self.launcher} ({self.source}): a world of {n}, rendezvous at {where}"


MPI_FLAVOURS = (
    # name, rank, size, local rank variables
    ("Open MPI mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ("MVAPICH mpirun", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", ("MV2_COMM_WORLD_LOCAL_RANK",)),
    ("MPICH/Intel MPI mpirun", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID")),
)


def has_mpi4py() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def discover(env: Mapping[str, str], *, mpi4py: Callable[[], bool] = has_mpi4py) -> Launch:
    """The launch this environment describes (see the module docstring for the precedence)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_vars(env)
    for name, rank_var, size_var, local_vars in MPI_FLAVOURS:
        if rank_var in env and size_var in env:
            return _from_mpi(env, name, rank_var, size_var, local_vars, mpi4py)
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return _from_slurm_step(env)
    partial = [v for v in ("RANK", "WORLD_SIZE") if v in env]
    if partial and (_int(env, "RANK", 0) > 0 or _int(env, "WORLD_SIZE", 1) > 1):
        missing = "WORLD_SIZE" if partial == ["RANK"] else "RANK"
        raise LaunchError(
            f"{partial[0]}={env[partial[0]]} is set but {missing} is not, and no MPI or Slurm launcher "
            f"variables are there: export both (with LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or start "
            f"with torchrun / deepspeed / mpirun / srun"
        )
    source = "no launcher variables"
    if "SLURM_JOB_ID" in env:  # e.g. a plain `python` line in an sbatch script: srun starts the tasks
        source = (
            f"inside Slurm job {env['SLURM_JOB_ID']} but not started by srun (no SLURM_STEP_NUM_TASKS); "
            "start the tasks with srun for more than one"
        )
    port = _int(env, "MASTER_PORT", 0) or free_local_port()
    return Launch("none", 0, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, source)


def _from_torch_vars(env: Mapping[str, str]) -> Launch:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    store = "; the store: torchrun's agent's" if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else ""
    if "TORCHELASTIC_RUN_ID" in env:
        name = "torchrun"
    elif "CROSS_RANK" in env:  # deepspeed/launcher/launch.py (pdsh or a single node)
        name = "deepspeed"
    elif "PMI_RANK" in env or "PMIX_RANK" in env:
        name = "deepspeed --launcher mpich/impi"
    else:
        name = "torch's environment variables"
    local = _local_rank(env, ("LOCAL_RANK",) + _all_local_vars(), world)
    addr, port, how = _rendezvous(env, world, name)
    return Launch(name, rank, local, world, addr, port, f"RANK, LOCAL_RANK, WORLD_SIZE{how}{store}")


def _from_mpi(env, name, rank_var, size_var, local_vars, mpi4py) -> Launch:
    rank, world = _int(env, rank_var), _int(env, size_var)
    _check_rank(rank, world, rank_var, size_var)
    source = f"{rank_var}, {size_var}"
    if "MASTER_ADDR" not in env and world > 1:
        if mpi4py():  # DeepSpeed's own discovery: rank 0's address broadcast over MPI
            port = _int(env, "MASTER_PORT", DEFAULT_PORT)
            local = _local_rank(env, local_vars, world, required=False)
            return Launch(name, rank, local, world, None, port, source)
        raise LaunchError(
            f"{name} started this process ({rank_var}={rank}, {size_var}={world}) but nobody exported "
            "MASTER_ADDR, the host of rank 0 where the processes meet. Either `pip install mpi4py` "
            "(DeepSpeed then finds it through MPI), or export it: " + _export_hint(name)
        )
    local = _local_rank(env, local_vars, world)
    addr, port, how = _rendezvous(env, world, name)
    return Launch(name, rank, local, world, addr, port, f"{source}, {local_vars[0]}{how}")


def _from_slurm_step(env: Mapping[str, str]) -> Launch:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    _check_rank(rank, world, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    local = _local_rank(env, ("SLURM_LOCALID",), world)
    addr, port, how = _rendezvous(env, world, "srun")
    return Launch(
        "Slurm srun",
        rank,
        local,
        world,
        addr,
        port,
        f"SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS{how}",
    )


def _rendezvous(env: Mapping[str, str], world: int, launcher: str) -> tuple[str, int, str]:
    """MASTER_ADDR / MASTER_PORT: exported ones win; else, in a Slurm step, the first host of the step
    and a port derived from the job id; a world of one meets itself on a free local port."""
    addr, port, how = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT", 0), []
    if world == 1:
        return addr or "127.0.0.1", port or free_local_port(), ""
    in_step = "SLURM_STEP_NUM_TASKS" in env
    if addr is None:
        nodes = next(
            (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if v in env), None
        )
        if not in_step or nodes is None:
            raise LaunchError(
                f"{launcher} started {world} processes but MASTER_ADDR (the host of rank 0) is not set: "
                + _export_hint(launcher)
            )
        addr = first_host(env[nodes])
        how.append(f"MASTER_ADDR: first host of {nodes}")
    if not port:
        if in_step and "SLURM_JOB_ID" in env:
            port = slurm_port(env["SLURM_JOB_ID"])
            how.append("MASTER_PORT: from SLURM_JOB_ID")
        else:
            port = DEFAULT_PORT
            how.append(f"MASTER_PORT: default {DEFAULT_PORT}")
    return addr, port, "".join(f"; {h}" for h in how)


def _export_hint(launcher: str) -> str:
    if "Open MPI" in launcher:
        return (
            "`mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ...` (with `deepspeed --launcher "
            "openmpi`: put the lines MASTER_ADDR=<first host> and MASTER_PORT=29500 in ./.deepspeed_env)"
        )
    if "MPI" in launcher:
        return "`mpirun -genv MASTER_ADDR <first host> -genv MASTER_PORT 29500 ...`"
    return "export MASTER_ADDR=<first host> MASTER_PORT=29500 before starting the processes"


def _all_local_vars() -> tuple[str, ...]:
    return tuple(v for *_, local in MPI_FLAVOURS for v in local) + ("SLURM_LOCALID",)


def _local_rank(env, names, world: int, required: bool = True) -> int:
    for name in names:
        if name in env:
            return _int(env, name)
    if world == 1 or not required:
        return 0
    raise LaunchError(
        f"no local rank (the process's index on its node, which picks its GPU): none of {', '.join(names)} "
        "is set; export LOCAL_RANK"
    )


def _check_rank(rank: int, world: int, rank_var: str, size_var: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{rank_var}={rank} does not fit {size_var}={world} (0 <= rank < world size)")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: str) -> int:
    """Every task of a Slurm job derives the same port from the job id, and jobs sharing a node get
    different ones: 15000 + the id's last four digits, PyTorch Lightning's rule
    (lightning/fabric/plugins/environments/slurm.py, ``SLURMEnvironment.main_port``)."""
    digits = re.sub(r"\D", "", job_id)  # an array task's id may read 1234_5
    if not digits:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} has no digits to derive MASTER_PORT from; export one")
    return 15000 + int(digits[-4:])


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded in Slurm's order (``scontrol show hostnames``):
    ``gpu[01-02,07],cpu3`` -> gpu01, gpu02, gpu07, cpu3; zero padding kept; several bracket groups in
    one name (``r[1-2]n[1-2]``) expand as a product, the first group outermost."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        names = [""]
        for text, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not text and not ranges:
                continue
            choices = _expand_ranges(ranges, hostlist) if ranges else [""]
            names = [n + text + c for n in names for c in choices]
        hosts += names
    if not hosts or any(not h or "[" in h or "]" in h for h in hosts):
        raise LaunchError(f"cannot read the Slurm host list {hostlist!r}; export MASTER_ADDR=<first host>")
    return hosts


def first_host(hostlist: str) -> str:
    return expand_hostlist(hostlist)[0]


def _split_top_level(s: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise LaunchError(f"unbalanced brackets in the Slurm host list {s!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise LaunchError(f"unbalanced brackets in the Slurm host list {s!r}")
    return [i for i in items + [cur] if i]


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise LaunchError(f"cannot read {part!r} in the Slurm host list {whole!r}")
        lo, hi = m[1], m[2] if m[2] is not None else m[1]
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def apply(launch: Launch, environ: dict | None = None) -> None:
    """Write the launch into the environment torch's ``env://`` rendezvous and DeepSpeed read. Under an
    MPI launcher without MASTER_ADDR, DeepSpeed's ``mpi_discovery`` (mpi4py) sets all five."""
    environ = os.environ if environ is None else environ
    if launch.mpi_discovery:
        from deepspeed.comm.comm import mpi_discovery

        mpi_discovery(distributed_port=launch.master_port, verbose=False)
        got = (int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        if got != (launch.rank, launch.world):
            raise LaunchError(
                f"mpi4py says rank {got[0]} of {got[1]}, "
                f"{launch.launcher} said {launch.rank} of {launch.world}"
            )
        return
    environ.update(
        RANK=str(launch.rank),
        LOCAL_RANK=str(launch.local_rank),
        WORLD_SIZE=str(launch.world),
        MASTER_ADDR=str(launch.master_addr),
        MASTER_PORT=str(launch.master_port),
    )
