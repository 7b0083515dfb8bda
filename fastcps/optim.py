"""The optimizer pieces the trainer hands DeepSpeed: AdamW that skips non-finite steps, and the EMA.

Both work on what DeepSpeed gives them: under ZeRO-3 each rank holds a partition of every parameter
(``p.ds_tensor``) and DeepSpeed calls ``step`` on its own (flattened, fp32) partition tensors.
"""

from __future__ import annotations

import contextlib

import torch

from fastcps import distributed as dist


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips a step when a gradient is not finite on some rank, or when the trainer flagged
    the accumulation window (``skip_flag``: a device bool, set when a micro-step's loss was not finite).

    The check costs one host synchronisation (and one all-reduce) per optimizer step, not per
    parameter and not per micro-step: the flags are reduced on the device and read once.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_flag: torch.Tensor | None = None
        self.last_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = None
        if grads:
            bad = ~torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if self.skip_flag is not None:
            flag = self.skip_flag if bad is None else self.skip_flag.to(bad.device)
            bad = flag if bad is None else bad | flag
        self.last_skipped = dist.any_rank(False if bad is None else bad)
        if self.last_skipped:
            return None
        return super().step(closure)


def local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's storage of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def refresh_whole_copies(params: list[torch.nn.Parameter]) -> None:
    """After writing ZeRO-3 partitions (``ds_tensor``) directly: a parameter below
    ``stage3_param_persistence_threshold`` (``ds_persist``) is also kept whole on every rank, and forwards
    read that copy, not the partition; DeepSpeed rebuilds it only after its own optimizer step, or when
    some forward happens to release it. Rebuild it from the partitions now, as DeepSpeed does after a
    step (release, then all-gather). Collective; a no-op without ZeRO-3 or without persistent parameters."""
    whole = [p for p in params if getattr(p, "ds_persist", False)]
    if not whole:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    held = [p for p in whole if p.ds_status == ZeroParamStatus.AVAILABLE]
    if held:
        held[0].partition(param_list=held)
    whole[0].all_gather(param_list=whole)


class EMA:
    """Exponential moving average of the trained weights, kept per rank on the local partitions
    (on the parameters' device, in fp32)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [local_tensor(p).detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(local_tensor(p).float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """The shadow weights in place of the trained ones, restored on exit (eval uses this)."""
        saved = [local_tensor(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            local_tensor(p).copy_(s)
        refresh_whole_copies(self.params)
        try:
            yield
        finally:
            for b, p in zip(saved, self.params):
                local_tensor(p).copy_(b)
            refresh_whole_copies(self.params)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        # torch.load puts tensors back where they were saved from; the shadow lives beside its params.
        self.shadow = [t.to(local_tensor(p).device).clone() for t, p in zip(state["shadow"], self.params)]
