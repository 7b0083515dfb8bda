"""The few collective helpers the trainer needs, over torch.distributed (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(backend: str | None = None) -> None:
    """Start the process group through DeepSpeed. A plain ``python -m fastcps.train`` (no launcher) runs
    as a world of one: the rendezvous variables are filled in here."""
    import deepspeed

    if "MASTER_PORT" not in os.environ:  # no launcher: a world of one on a free local port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    local_device()  # before the process group: NCCL binds each rank to the current device
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


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
