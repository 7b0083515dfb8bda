"""Test-only hooks for the wiring tests (tests/test_wiring.py): a reward with a known direction, an
engine that stands in for DeepSpeed's in one process, and a recorder of what the update is fed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


class Brightness:
    """Mean pixel value of each image, in [0, 1]: a reward any policy can move, read off the images."""

    def __call__(self, images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3))


class Darkness:
    """1 − brightness: with Brightness it makes a weighted total whose components are known exactly."""

    def __call__(self, images, prompts, metadata):
        return 1.0 - images.float().mean(dim=(1, 2, 3))


def toy_config(sets=()):
    """The digits toy's run config (configs/digits_cps.json) with ``sets`` (``"field=value"``) applied."""
    from fastcps.config import RunConfig
    from fastcps.config import load_config

    return load_config(RunConfig, str(ROOT / "configs" / "digits_cps.json"), list(sets))


def brightness_reward(delay: float = 0.0):
    """A trainer reward (``RewardOutput``): each image's brightness, as the total and as its one component.
    It checks that each image comes with its own prompt's metadata (the digit); ``delay`` s per call."""
    from fastcps.prompts import load_prompts
    from fastcps.rewards import RewardOutput

    meta_of = dict(zip(*load_prompts("digits")))

    def reward(images, prompts, metadata):
        assert metadata == [meta_of[p] for p in prompts]
        time.sleep(delay)
        value = Brightness()(images, prompts, metadata)
        return RewardOutput(value, {"brightness": value})

    return reward


def toy_rollout(cfg, policy, epoch: int, *, reward=None, device="cpu", **kwargs):
    """``rollout_epoch`` of the digits prompts with the epoch's sampling steps, a brightness reward unless
    ``reward``."""
    from fastcps.prompts import load_prompts
    from fastcps.rollout import PromptEncodings, epoch_steps, rollout_epoch

    return rollout_epoch(
        cfg,
        epoch,
        epoch_steps(cfg, epoch, policy),
        policy,
        policy.transformer,
        reward or brightness_reward(),
        PromptEncodings(policy),
        load_prompts("digits"),
        device=torch.device(device),
        **kwargs,
    )


def advantages_by_hand(rewards, groups, *, std: str = "prompt", clip: float = 5.0) -> np.ndarray:
    """GRPO advantages in numpy, float64, from the definition: (r - group mean) / (std + 1e-4), the
    population std of the group (``prompt``) or of all rewards (``global``), clipped to ±clip."""
    r, g = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    mean = np.array([r[g == k].mean() for k in g])
    spread = np.array([r[g == k].std() for k in g]) if std == "prompt" else r.std()
    return np.clip((r - mean) / (spread + 1e-4), -clip, clip)


class PlainEngine:
    """``deepspeed.initialize``'s engine as the trainer uses it, for one process without ZeRO: backward
    accumulates, ``step`` at an accumulation boundary clips the gradient norm (DeepSpeed's
    ``gradient_clipping``), steps the optimizer and clears the gradients. Checkpoints are one file of
    model and optimizer state per tag, with DeepSpeed's ``latest`` file beside them."""

    def __init__(self, model, optimizer, config):
        self.module, self.optimizer, self.clip = model, optimizer, config.get("gradient_clipping")
        self.boundary = True

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, flag: bool) -> None:
        self.boundary = flag

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        if not self.boundary:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.clip:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return not self.optimizer.last_skipped

    def save_checkpoint(
        self,
        root: str,
        tag: str,
        client_state: dict,
        exclude_frozen_parameters: bool = False,
        save_latest: bool = True,
    ) -> None:
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "client": client_state,
            },
            folder / "state.pt",
        )
        if save_latest:
            (Path(root) / "latest").write_text(tag)

    def load_checkpoint(self, root: str, tag: str | None = None, load_module_strict: bool = True):
        tag = tag or (Path(root) / "latest").read_text().strip()
        state = torch.load(Path(root) / tag / "state.pt", weights_only=False)
        self.module.load_state_dict(state["module"], strict=load_module_strict)
        self.optimizer.load_state_dict(state["optimizer"])
        return str(Path(root) / tag), state["client"]


class RecordingEngine:
    """DeepSpeed's engine as ``run_update`` uses it, without training: ``backward`` records the (detached)
    loss it is handed, ``step`` at an accumulation boundary records the optimizer's ``skip_flag`` as it
    is (a device bool: reading it would need a real device), and every optimizer step applies. Works on
    fake CUDA tensors, where the autograd engine cannot run."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer
        self.losses, self.boundaries, self.skip_flags, self.boundary = [], [], [], False

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, flag: bool) -> None:
        self.boundary = flag
        self.boundaries.append(flag)

    def backward(self, loss) -> None:
        self.losses.append(loss.detach())

    def step(self) -> None:
        if self.boundary:
            self.skip_flags.append(self.optimizer.skip_flag)

    def was_step_applied(self) -> bool:
        return True


class FlagOptimizer:
    """The two attributes ``run_update`` sets on the optimizer (fastcps.optim.SkippingAdamW's)."""

    skip_flag, last_skipped = None, False


def plain_initialize(model, optimizer, config):
    """Stands in for ``deepspeed.initialize`` (monkeypatched): no process group, no ZeRO."""
    return PlainEngine(model, optimizer, config), optimizer, None, None


class UpdateDump:
    """Records, for every training micro-step (``fastcps.update.micro_step_loss`` with gradients on,
    i.e. not the old-log-prob recompute), each sample's global index (rank·n + local index), epoch,
    trained-step index, prompt slot, reward, the advantage the loss was given and the latents it was
    given; ``save()`` writes them to ``<folder>/run<k>.rank<r>.pt``."""

    def __init__(self, folder: Path):
        import fastcps.trainer as trainer
        import fastcps.update as update

        self.folder, self.records, self.run = Path(folder), [], 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.where: dict = {}
        real_run, real_loss = trainer.run_update, update.micro_step_loss

        def run_update(engine, optimizer, policy, data, adv, train_cfg, *, epoch, seed, rank=0, **kwargs):
            self.where = {"epoch": epoch, "rank": rank, "offset": rank * data.x_t.shape[0]}
            return real_run(
                engine, optimizer, policy, data, adv, train_cfg, epoch=epoch, seed=seed, rank=rank, **kwargs
            )

        def micro_step_loss(policy, model, data, mb, j, old_logp, adv, **kwargs):
            if torch.is_grad_enabled():
                local = mb.cpu()
                self.records.append(
                    {
                        **self.where,
                        "j": j,
                        "index": (local + self.where["offset"]).tolist(),
                        "group": data.group[local].tolist(),
                        "reward": data.reward[local].clone(),
                        "adv": adv.detach().cpu().clone(),
                        "x_t": data.x_t[mb, j].detach().cpu().clone(),
                        "x_next": data.x_next[mb, j].detach().cpu().clone(),
                    }
                )
            return real_loss(policy, model, data, mb, j, old_logp, adv, **kwargs)

        trainer.run_update, update.micro_step_loss = run_update, micro_step_loss

    def start(self, run: int) -> None:
        self.run, self.records = run, []

    def save(self) -> None:
        rank = int(os.environ.get("RANK", "0"))
        torch.save(self.records, self.folder / f"run{self.run}.rank{rank}.pt")


def load_dump(folder: Path, run: int) -> dict[tuple[int, int, int], dict]:
    """(epoch, global index, trained step) -> that sample's record, over all ranks of one run."""
    out = {}
    for path in sorted(Path(folder).glob(f"run{run}.rank*.pt")):
        for rec in torch.load(path, weights_only=False):
            for i, g in enumerate(rec["index"]):
                key = (rec["epoch"], g, rec["j"])
                assert key not in out, f"sample {key} trained twice in one pass ({path})"
                out[key] = {
                    "group": rec["group"][i],
                    "reward": float(rec["reward"][i]),
                    "adv": float(rec["adv"][i]),
                    "x_t": rec["x_t"][i],
                    "x_next": rec["x_next"][i],
                }
    return out


class PartitionProbe:
    """Records how DeepSpeed's ZeRO-3 holds the trained module of every run (``fastcps.trainer.Trainer``),
    so that a test can tell a partitioned run from one where every tensor stayed whole (below
    ``stage3_param_persistence_threshold``): right after the engine is built, per parameter, its full
    size (``ds_numel``), this rank's partition (``ds_tensor``), what it holds at rest (``data``: empty
    once released), ``ds_persist``, and whether it trains; and, over the run, the forwards of LoRA-wrapped
    frozen layers with the adapters off (the reference policy: ``train.beta_kl > 0``) or on, each with
    whether the frozen weight was partitioned and whether it was gathered whole for that forward.
    ``save()`` writes ``<folder>/run<k>.rank<r>.json``."""

    def __init__(self, folder: Path):
        import fastcps.trainer as trainer

        self.folder, self.run, self.params, self.forwards = Path(folder), 0, {}, {}
        self.folder.mkdir(parents=True, exist_ok=True)
        real_init, probe = trainer.Trainer.__init__, self

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            probe.record(self.engine.module)

        trainer.Trainer.__init__ = init

    def record(self, module) -> None:
        for name, p in module.named_parameters():
            self.params[name] = {
                "trained": p.requires_grad,
                "numel": int(getattr(p, "ds_numel", p.numel())),
                "local": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else None,
                "held": int(p.data.numel()),
                "persist": bool(getattr(p, "ds_persist", False)),
            }
        for name, m in module.named_modules():
            if hasattr(m, "base_layer") and hasattr(m, "disable_adapters"):  # peft's LoraLayer
                m.base_layer.register_forward_hook(self._hook(m))

    def _hook(self, lora_layer):
        def hook(layer, args, output):
            w = layer.weight
            key = "reference" if lora_layer.disable_adapters else "policy"
            partitioned = hasattr(w, "ds_tensor") and not w.ds_persist and w.ds_tensor.numel() < w.ds_numel
            gathered = w.data.numel() == getattr(w, "ds_numel", w.numel())
            stats = self.forwards.setdefault(key, {"calls": 0, "partitioned": 0, "gathered": 0})
            stats["calls"] += 1
            stats["partitioned"] += int(partitioned)
            stats["gathered"] += int(gathered)

        return hook

    def start(self, run: int) -> None:
        self.run, self.params, self.forwards = run, {}, {}

    def save(self) -> None:
        import json

        rank = int(os.environ.get("RANK", "0"))
        (self.folder / f"run{self.run}.rank{rank}.json").write_text(
            json.dumps({"params": self.params, "forwards": self.forwards}, indent=1)
        )
