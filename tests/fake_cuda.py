"""Fake CUDA for the CPU suite: move a built policy onto a fake device, and watch a code path for host
synchronisations and device transfers.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` tensors on device ``cuda`` need no GPU: ops
compute shapes, dtypes and devices only. An op that mixes a CUDA and a CPU tensor raises
``FakeTensorDeviceMismatchError`` (as on a GPU), and reading a value (``bool()``, ``.item()``) raises
``DataDependentOutputException`` (on a GPU it would stall the stream until the value arrives).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Host-side state a policy keeps on the CPU on purpose (the schedule is read as Python values).
HOST_ATTRS = ("_sigma_cache",)


def _fake(t: torch.Tensor, mode, device) -> torch.Tensor:
    return mode.from_tensor(t.detach()).to(device)


def _fake_module(module: torch.nn.Module, mode, device, seen: dict) -> None:
    """``seen`` maps id(original) -> (original, replacement): holding the original keeps its id from
    being reused by a new object while the conversion runs (a reused id would alias two tensors)."""
    for m in module.modules():
        if id(m) in seen:
            continue
        seen[id(m)] = (m, m)
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:  # tied weights stay tied
                seen[id(p)] = (p, torch.nn.Parameter(_fake(p, mode, device), requires_grad=p.requires_grad))
            m._parameters[name] = seen[id(p)][1]
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = _fake(b, mode, device)


def fake_policy(policy, mode, device="cuda"):
    """Replace, in place, every parameter and buffer of the modules ``policy`` holds (its transformer,
    frozen encoders, VAE, reference copy, a diffusers pipeline's components) and its tensor attributes
    by fake tensors on ``device``; the policy's own ``device`` becomes ``device``."""
    device = torch.device(device)
    seen: dict = {}

    def convert(value):
        if isinstance(value, torch.nn.Module):
            _fake_module(value, mode, device, seen)
            return value
        if isinstance(value, torch.Tensor):
            return _fake(value, mode, device)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if hasattr(value, "components") and isinstance(getattr(value, "components"), dict):  # a pipeline
            for comp in value.components.values():
                if isinstance(comp, torch.nn.Module):
                    _fake_module(comp, mode, device, seen)
        return value

    with mode:  # .to("cuda") of a fake tensor outside its mode would initialise the real CUDA
        for name, value in list(vars(policy).items()):
            if name not in HOST_ATTRS:
                setattr(policy, name, convert(value))
    policy.device = device
    return policy


class HostSyncError(AssertionError):
    """A hot path read a device value on the host or moved a tensor between devices."""


class NoHostTraffic(TorchDispatchMode):
    """Inside this mode, any op that reads a tensor's value on the host (``aten._local_scalar_dense``:
    ``bool()``, ``.item()``, ``float()``) or whose tensors sit on more than one device (a copy between
    host and device, an index tensor on the other device) raises ``HostSyncError`` naming the op.
    0-dim CPU tensors beside device tensors are allowed: PyTorch passes them as scalars.

    ``allow_uploads=True`` lets host -> device copies through (``fastcps.rollout.to_device`` makes
    them from pinned memory: they do not wait for the device) and counts them in ``uploads``."""

    def __init__(self, allow_uploads: bool = False):
        super().__init__()
        self.allow_uploads, self.uploads = allow_uploads, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostSyncError(f"{func}: a device value is read on the host (bool()/item()/float())")
        out = func(*args, **kwargs)
        devices = {
            t.device.type
            for t in tree_leaves((args, kwargs, out))
            if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
        }
        if len(devices) > 1:
            upload = func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu"
            if not (upload and self.allow_uploads):
                raise HostSyncError(f"{func} moves data between {sorted(devices)}")
            self.uploads += 1
        return out


def full_size_transformer(policy, family: str, config_name: str, lora) -> int:
    """Replace a tiny policy's transformer with the real architecture of ``configs/models/<config_name>``
    (meta, bf16, gradient checkpointing, the config's LoRA); returns its parameter count. ``fake_policy``
    then puts it on the fake device."""
    import json
    from pathlib import Path

    from fastcps.policies import family as family_of

    path = Path(__file__).resolve().parent.parent / "configs" / "models" / config_name
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        big = family_of(family).transformer_class().from_config(config)
    policy.transformer = big.to(torch.bfloat16)
    policy.transformer.enable_gradient_checkpointing()
    policy.add_lora(lora.r, lora.alpha)
    return sum(p.numel() for p in policy.transformer.parameters())


def rollout_and_micro_step(cfg, sampling, policy, reward, encodings, pool, device, samples: int):
    """Under a fake mode (``sampling``: ``epoch_steps``, computed before it, on the host): the epoch's
    rollout, its advantages and one training micro-step of the first ``cfg.train.minibatch_size`` samples,
    the micro-step watched for host traffic. (data, loss output, log-prob)."""
    from fastcps.rollout import rollout_epoch
    from fastcps.update import epoch_advantages, micro_step_loss, minibatches

    data = rollout_epoch(cfg, 0, sampling, policy, policy.transformer, reward, encodings, pool, device=device)
    adv = epoch_advantages(data, cfg.train, device)
    mb = minibatches(samples, cfg.train.minibatch_size, (0,), device)[0]
    with NoHostTraffic():
        out, logp = micro_step_loss(
            policy,
            policy.transformer,
            data,
            mb,
            0,
            data.log_prob[mb, 0],
            adv.local[mb],
            clip_range=cfg.train.clip_range,
            beta_kl=cfg.train.beta_kl,
        )
    return data, out, logp
