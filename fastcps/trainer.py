"""The GRPO trainer. One epoch, in DESIGN.md's order:

    prompts -> cached encodings -> rollout (any sampler) -> decode -> rewards -> advantages (groups
    across ranks) -> update (fused log-prob/KL op, clipped GRPO loss + beta*KL, DeepSpeed) -> metrics

Nothing here knows which model it trains: the policy adapter answers every model question. The
epoch's halves are functions of their own (``fastcps.rollout.rollout_epoch``,
``fastcps.update.epoch_advantages`` / ``run_update``), so tests can run them without DeepSpeed, on fake
CUDA tensors. Every random choice is derived from (seed, epoch, ...), so a resumed run repeats an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import time
from pathlib import Path

import torch

from fastcps import checkpoint as ckpt
from fastcps import distributed as dist
from fastcps.config import RunConfig
from fastcps.configlib import to_dict
from fastcps.logger import RunLogger, plot_reward_curve
from fastcps.optim import EMA, SkippingAdamW
from fastcps.policies import build_policy
from fastcps.prompts import load_prompts, truncation_report
from fastcps.rewards import WeightedReward
from fastcps.rollout import (PromptEncodings, epoch_plan, eval_noise, eval_prompt_set, plan_steps, rollout_epoch,
                             sample, synchronize)
from fastcps.update import epoch_advantages, run_update


class Interrupted(Exception):
    """SIGTERM or Ctrl-C arrived: checkpoint and leave."""


class NonFiniteStop(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """One run: builds the policy, rewards and DeepSpeed engine from ``cfg``; ``fit()`` runs the
    epochs with eval and checkpoints; ``state_dict()`` is what a resume restores."""

    def __init__(self, cfg: RunConfig, run_dir: Path, policy=None):
        import deepspeed

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world = dist.rank(), dist.world()
        self.device = dist.local_device()
        torch.manual_seed(cfg.seed)
        self.prompts, self.prompt_meta = load_prompts(cfg.prompts.source)
        self.eval_prompts = list(zip(*eval_prompt_set(cfg)))

        self.policy = policy if policy is not None else build_policy(cfg.policy, self.device)
        self.encodings = PromptEncodings(self.policy, max_bytes=cfg.policy.prompt_cache_gib * 2**30)
        self._report_truncation()
        self.reward_fn = WeightedReward([(r.name, r.weight, r.args) for r in cfg.rewards])
        t = cfg.train
        self.optimizer = SkippingAdamW(self.policy.trainable_parameters(), lr=t.lr, betas=tuple(t.betas),
                                       eps=t.adam_eps, weight_decay=t.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=self.policy.transformer, optimizer=self.optimizer,
                                                    config=self._deepspeed_config())
        trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.ema = EMA(trained, t.ema_decay) if t.ema_decay else None
        self.epoch = 0  # next epoch to run
        self.nonfinite_in_a_row = 0
        self.skipped_total = 0
        self._stop_signal = False
        self.logger = RunLogger(self.run_dir, enabled=dist.is_main(), tensorboard=cfg.log.tensorboard,
                                wandb=cfg.log.wandb, config=to_dict(cfg))

    def _report_truncation(self) -> None:
        """Prompts longer than policy.max_sequence_length are cut by the text encoder: say so once."""
        if not dist.is_main():
            return
        counts = self.policy.text_token_counts(self.prompts + [p for p, _ in self.eval_prompts])
        line = None if counts is None else truncation_report(counts, self.cfg.policy.max_sequence_length)
        if line:
            print(f"[fastcps] warning: {line}", flush=True)

    def _deepspeed_config(self) -> dict:
        path = Path(self.cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {str(path)!r} (config key `deepspeed_config`) not found")
        ds = json.loads(path.read_text())
        t = self.cfg.train
        # Accumulation is driven explicitly (set_gradient_accumulation_boundary): one window covers
        # gradient_accumulation_steps minibatches x every trained step, whose count may change per epoch.
        ds.update(train_micro_batch_size_per_gpu=t.minibatch_size, gradient_accumulation_steps=1,
                  train_batch_size=t.minibatch_size * self.world, gradient_clipping=t.max_grad_norm)
        ds.setdefault("zero_allow_untested_optimizer", True)  # our AdamW subclass skips non-finite steps
        ds.setdefault("steps_per_print", 10**9)
        dtype = self.cfg.policy.dtype
        ds["bf16"] = {"enabled": dtype == "bf16"}
        ds["fp16"] = {"enabled": dtype == "fp16"}
        return ds

    def _check_stop(self) -> None:
        if dist.any_rank(self._stop_signal):
            raise Interrupted()

    @property
    def _progress(self) -> bool:
        return dist.is_main() and self.cfg.log.progress

    # --- one epoch --------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        data = rollout_epoch(cfg, epoch, epoch_plan(cfg, epoch, self.policy), self.policy, self.engine, self.reward_fn,
                             self.encodings, (self.prompts, self.prompt_meta), device=self.device, rank=self.rank, world=self.world,
                             check_stop=self._check_stop, progress=self._progress)
        t_rollout = time.perf_counter() - t0
        adv = epoch_advantages(data, cfg.train, self.device, rank=self.rank)
        synchronize(self.device)
        t1 = time.perf_counter()
        # A stop waits for the end of the update (see fit).
        stats = run_update(self.engine, self.optimizer, self.policy, data, adv.local, cfg.train, epoch=epoch,
                           seed=cfg.seed, rank=self.rank, progress=self._progress,
                           after_optimizer_step=lambda skipped: self._after_optimizer_step(epoch, skipped))
        train_metrics = stats.metrics() if stats is not None else {}  # reads the device: synchronises
        t_update = time.perf_counter() - t1
        rewards = adv.rewards
        metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False))}
        for name, comp in data.components.items():
            metrics[f"reward/{name}/mean"] = float(dist.all_gather_cat(comp).mean())
        metrics.update(train_metrics)
        metrics.update({
            "train/zero_std_frac": float(adv.zero_std_frac),
            "train/skipped_steps": float(self.skipped_total),
            "train/trained_steps": float(len(data.plan.trained)),
            "time/rollout_s": t_rollout - data.reward_time,
            "time/reward_s": data.reward_time,
            "time/update_s": t_update,  # includes the recompute
            "time/recompute_s": stats.recompute_s if stats is not None else 0.0,
            "time/epoch_s": time.perf_counter() - t0,
            "perf/images_per_s": rewards.numel() / max(time.perf_counter() - t0, 1e-9),
            "memory/peak_gib": peak_memory_gib(self.device),
        })
        every = cfg.log.images_every
        if every and (epoch + 1) % every == 0:
            self.logger.images("rollout/images", data.preview[:16], epoch + 1)
        return metrics

    def _after_optimizer_step(self, epoch: int, skipped: bool) -> None:
        if skipped:
            self.nonfinite_in_a_row += 1
            self.skipped_total += 1
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteStop(
                    f"stopping at epoch {epoch}: {self.nonfinite_in_a_row} optimizer steps in a row had a "
                    "non-finite loss or gradient and were skipped (train.max_nonfinite_steps). Lower train.lr, "
                    "check the rewards for NaN/inf, or use fp32 (policy.dtype).")
        else:
            self.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update()

    # --- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """ODE samples of the fixed eval set: eval/<reward> and eval/diversity (mean pairwise L2
        distance between the images of one prompt: the guard against mode collapse)."""
        cfg, e = self.cfg, self.cfg.eval
        k = e.images_per_prompt
        per_rank = math.ceil(len(self.eval_prompts) / self.world)  # equal forwards on every rank (ZeRO-3)
        mine = [i * self.world + self.rank for i in range(per_rank)]
        plan = plan_steps("ode", None, self.policy.sigmas(e.num_steps or cfg.sampler.num_steps, device="cpu"))
        plan = plan.to(self.device)
        sums: dict[str, float] = {}
        div_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_prompts, n_images = 0, 0
        first_images = None
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            for p_idx in mine:
                real = p_idx < len(self.eval_prompts)
                prompt, meta = self.eval_prompts[min(p_idx, len(self.eval_prompts) - 1)]
                x1 = eval_noise(self.policy, e.seed, p_idx, k, self.device)
                cond, _ = self.encodings.for_prompts([prompt], self.device)
                images = self.policy.decode(sample(self.policy, self.engine, cond, x1, plan).final)
                if not real:
                    continue
                r = self.reward_fn(images, [prompt] * k, [meta] * k)  # CPU tensors
                for name, comp in r.components.items():
                    sums[name] = sums.get(name, 0.0) + float(comp.sum())
                if k > 1:
                    div_sum += torch.pdist(images.reshape(k, -1).float()).mean()
                n_prompts += 1
                n_images += k
                first_images = images if first_images is None else torch.cat([first_images, images])
        names = [n for n, _, _ in self.reward_fn.parts]
        vec = torch.tensor([sums.get(n, 0.0) for n in names] + [float(div_sum), n_prompts, n_images],
                           dtype=torch.float64)
        vec = dist.all_reduce(vec)
        out = {f"eval/{n}": float(vec[i] / vec[-1]) for i, n in enumerate(names)}
        out["eval/diversity"] = float(vec[len(names)] / vec[len(names) + 1])
        every = cfg.log.images_every
        if first_images is not None and (step == 0 or (every and step % every == 0) or step == cfg.train.num_epochs):
            self.logger.images("eval/images", first_images[: 4 * k], step)
        return out

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        handlers = self._install_signal_handlers()
        last: dict[str, float] = {}
        try:
            if self.epoch == 0 and cfg.eval.every:
                last = self.evaluate(0)
                self.logger.scalars(last, 0)
                if dist.is_main():
                    print(f"[fastcps] base model: {self._fmt(last)}", flush=True)
            for epoch in range(self.epoch, cfg.train.num_epochs):
                metrics = self.run_epoch(epoch)
                self.epoch = epoch + 1
                if cfg.eval.every and (self.epoch % cfg.eval.every == 0 or self.epoch == cfg.train.num_epochs):
                    metrics.update(self.evaluate(self.epoch))
                self.logger.scalars(metrics, self.epoch)
                last = metrics
                if dist.is_main():
                    print(f"[fastcps] epoch {self.epoch}/{cfg.train.num_epochs}: {self._fmt(metrics)}", flush=True)
                if cfg.checkpoint.every and self.epoch % cfg.checkpoint.every == 0 and self.epoch < cfg.train.num_epochs:
                    self.save_checkpoint(f"epoch{self.epoch:05d}", periodic=True)
                self._check_stop()
            self.save_checkpoint("final")
        except Interrupted:
            # A stop lands in a rollout (checked per rollout batch: nothing has changed yet, a resume runs
            # that epoch again) or at the end of an epoch (a stop during the update lets the update finish:
            # its rollout would be gone, so the rest of it could not be redone). Either way every random
            # choice is derived from (seed, epoch), and the resumed run ends where an uninterrupted one ends.
            tag = f"interrupted_epoch{self.epoch:05d}"
            self.save_checkpoint(tag)
            if dist.is_main():
                print(f"[fastcps] interrupted: checkpoint {self.run_dir / 'checkpoints' / tag}; resume with "
                      f"--resume {self.run_dir} (it starts at epoch {self.epoch + 1})", flush=True)
        finally:
            self._restore_signal_handlers(handlers)
            if dist.is_main():
                plot_reward_curve(self.run_dir)
            self.logger.close()
        return last

    @staticmethod
    def _fmt(m: dict[str, float]) -> str:
        keys = [k for k in m if k.startswith("eval/") or k in ("reward/mean", "train/ratio_dev", "time/epoch_s")]
        return "  ".join(f"{k}={m[k]:.4g}" for k in keys)

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_signal and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: leave now
            self._stop_signal = True
            if dist.is_main():
                print(f"\n[fastcps] got signal {signum}: writing a checkpoint at the next step", flush=True)

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(handlers) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "skipped_total": self.skipped_total, "config": to_dict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.skipped_total = int(state["skipped_total"])

    def save_checkpoint(self, tag: str, periodic: bool = False) -> Path:
        return ckpt.save_checkpoint(self.engine, self.run_dir, tag, {"trainer": self.state_dict()}, ema=self.ema,
                                    policy_name=self.cfg.policy.name, lora=self.policy.lora,
                                    keep=self.cfg.checkpoint.keep if periodic else None)

    def load_checkpoint(self, run_dir: Path) -> None:
        client = ckpt.load_checkpoint(self.engine, run_dir, ema=self.ema, lora=self.policy.lora)
        self.load_state_dict(client["trainer"])
        if dist.is_main():
            ckpt.set_aside_later_metrics(run_dir, self.epoch)
