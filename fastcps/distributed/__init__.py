"""The few collective helpers the trainer needs, over torch.distributed (gloo on CPU, nccl on GPU), the
process group's start from whatever launcher started this process (``launchers``), its collective
timeouts, and the channel that makes the ranks fail together (``failure``)."""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fastcps.distributed.failure import Exit, Failure, FailureChannel, symptom
from fastcps.distributed import launchers
from fastcps.distributed.launchers import Launch, LaunchError, discover

log = logging.getLogger(__name__)

__all__ = [
    "Exit",
    "Failure",
    "FailureChannel",
    "Launch",
    "LaunchError",
    "all_gather_cat",
    "all_reduce",
    "any_rank",
    "barrier",
    "collective_timeout",
    "comm_device",
    "current_timeout_s",
    "discover",
    "init",
    "is_main",
    "local_device",
    "open_failure_channel",
    "rank",
    "set_collective_timeout",
    "symptom",
    "world",
]

_timeout_s: float | None = None  # the collective timeout set last (None: the backend's default)


def init(
    backend: str | None = None, *, timeout_s: float | None = None, launch: Launch | None = None
) -> Launch:
    """Start the process group through DeepSpeed, from the launcher's variables (``launchers.discover``:
    torchrun, deepspeed, mpirun, srun; none: a world of one on a free local port). ``timeout_s``: the
    collectives' timeout (DeepSpeed's default: 10 minutes or ``DEEPSPEED_TIMEOUT``). Logs on rank 0 which
    launcher was found and the world. Returns the launch."""
    import deepspeed

    launch = launch or discover(os.environ)
    launchers.apply(launch)
    local_device()  # before the process group: NCCL binds each rank to the current device
    if not dist.is_initialized():
        global _timeout_s
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
        _timeout_s = timeout_s
        log.info(launch.describe())
    return launch


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK``, made current (so NCCL and every allocation that
    names plain ``cuda`` use it: without this, all ranks of a node would share GPU 0 until DeepSpeed's
    engine sets the device, after the policy is already built), or the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors from every rank, in rank order, on ``t``'s device (the
    collective itself runs on the backend's device: CUDA for nccl, CPU for gloo)."""
    if world() == 1:
        return t.clone()
    buf = t.contiguous().to(comm_device())
    out = [torch.empty_like(buf) for _ in range(world())]
    dist.all_gather(out, buf)
    return torch.cat(out).to(t.device)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world() == 1:
        return t
    buf = t.clone().to(comm_device())
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks take the same branch).
    A tensor flag is reduced where it lives and read once: one host synchronisation."""
    if isinstance(flag, torch.Tensor):
        flag = flag.reshape(1).to(torch.float32)
    else:
        flag = torch.tensor([float(flag)])
    if world() > 1:
        flag = all_reduce(flag, dist.ReduceOp.MAX)
    return bool(flag[0] > 0)


def current_timeout_s() -> float | None:
    """The collective timeout set last through ``init`` or ``set_collective_timeout`` (None: the
    backend's default)."""
    return _timeout_s


def set_collective_timeout(seconds: float) -> None:
    """Every later collective of every process group (the default one and those DeepSpeed made) gives up
    after ``seconds``; a rank that gives up raises (gloo) or is aborted (NCCL) instead of hanging."""
    global _timeout_s
    if not dist.is_initialized() or seconds == _timeout_s:
        return
    td = timedelta(seconds=seconds)
    from torch.distributed import distributed_c10d as c10d

    groups = list(getattr(getattr(c10d, "_world", None), "pg_map", {})) or [None]
    for group in groups:
        dist.set_timeout(td, group=group)
    _timeout_s = seconds


@contextlib.contextmanager
def collective_timeout(seconds: float):
    """``set_collective_timeout(seconds)`` inside, the previous timeout after (e.g. a checkpoint save,
    whose rank 0 writes while the others wait, under the long loading timeout)."""
    before = _timeout_s
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        if before is not None:
            set_collective_timeout(before)


def open_failure_channel(*, heartbeat_timeout_s: float, poll_s: float = 1.0) -> FailureChannel | None:
    """The failure channel over the process group's store, its watchdog started; None for a world of one
    (nobody to tell). The ranks open their channels together (one barrier), so that a neighbour whose
    heartbeat never comes is a dead one, not a late one."""
    if world() == 1:
        return None
    barrier()
    from torch.distributed import distributed_c10d as c10d

    where = f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    channel = FailureChannel(
        c10d._get_default_store(),
        rank(),
        world(),
        heartbeat_timeout_s=heartbeat_timeout_s,
        poll_s=poll_s,
        where=where,
    )
    return channel.start()
