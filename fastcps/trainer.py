"""The GRPO trainer. One epoch, in this order:

    prompts -> cached encodings -> rollout (any sampler) -> decode -> rewards -> advantages (groups
    across ranks) -> update (fused log-prob/KL op, clipped GRPO loss + beta*KL, DeepSpeed) -> metrics

Nothing here knows which model it trains: the policy adapter answers every model question. The
epoch's halves are functions of their own (``fastcps.rollout.rollout_epoch``,
``fastcps.update.epoch_advantages`` / ``run_update``), so tests can run them without DeepSpeed, on fake
CUDA tensors. Every random choice is derived from (seed, epoch, ...), so a resumed run repeats an
uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

from fastcps import checkpoint as ckpt
from fastcps import distributed as dist
from fastcps.config import RunConfig, to_dict
from fastcps.engine import deepspeed_config, keep_lora_whole, partition_zero3
from fastcps.evaluation import evaluate
from fastcps.fetch import ensure_local
from fastcps.logger import RunLogger, metrics_line, plot_reward_curve
from fastcps.optim import EMA, SkippingAdamW
from fastcps.perf import FlopLedger, GatherMeter, peak_tflops
from fastcps.perf import metrics as perf_metrics
from fastcps.plan import resolve_auto
from fastcps.edit_images import check_rows_fit_policy
from fastcps.policies import build_policy
from fastcps.policies.families import family
from fastcps.prompts import held_out_warning, load_prompts, truncation_report
from fastcps.rewards import WeightedReward, check_services
from fastcps.rollout import PromptEncodings, epoch_steps, eval_prompt_set, rollout_epoch
from fastcps.runtime import GIB, peak_memory_gib, synchronize
from fastcps.stopping import Interrupted, NonFiniteStop, SignalStop
from fastcps.update import epoch_advantages, run_update

log = logging.getLogger(__name__)


def _under_load_timeout(method):
    """Run a Trainer method under the long collective timeout (``distributed.load_timeout_s``): a
    checkpoint save, whose rank 0 writes the consolidated weights while the other ranks wait."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with dist.collective_timeout(self.cfg.distributed.load_timeout_s):
            return method(self, *args, **kwargs)

    return wrapper


def evaluate_with(step: int = 1, **parts) -> dict[str, float]:
    """``Trainer.evaluate`` on the given parts (``cfg``, ``world``, ``rank``, ``device``, ``policy``,
    ``engine``, ``encodings``, ``eval_prompts``, ``reward_fn``, ``ema``, ``logger``) without building a
    run: the resource plan counts an eval's calls on its stand-ins with it (``fastcps.plan.epoch``). The
    trainer passes it to the plan (``resolve_auto``), so the plan never imports the trainer."""
    trainer = Trainer.__new__(Trainer)
    trainer.__dict__.update(parts)
    return trainer.evaluate(step)


class Trainer:
    """One run: builds the policy, rewards and DeepSpeed engine from ``cfg``; ``fit()`` runs the
    epochs with eval and checkpoints; ``state_dict()`` is what a resume restores."""

    def __init__(self, cfg: RunConfig, run_dir: Path, policy=None):
        import deepspeed

        self.rank, self.world = dist.rank(), dist.world()
        self.device = dist.local_device()
        # every file the run needs, on this node, before anything loads (the plan below may read prompts):
        # offline a missing one fails every rank now, not at a collective's timeout later
        ensure_local(cfg, policy=policy is None)
        # every reward service (`remote`) answers and is ready: a down one stops every rank now (exit 3),
        # not in the first rollout once every model has loaded
        check_services([(r.name, r.args) for r in cfg.rewards])
        # the prompts, checked to fit the policy (edit rows for an editing one), before the plan and models
        self.prompts, self.prompt_meta = load_prompts(cfg.prompts.source)
        self.eval_prompts = list(zip(*eval_prompt_set(cfg)))
        editing = family(cfg.policy.name).editing
        check_rows_fit_policy(cfg.policy.name, editing, self.prompts, self.prompt_meta, "prompts.source")
        eval_key = "prompts.eval_source" if cfg.prompts.eval_source else "prompts.source"
        check_rows_fit_policy(cfg.policy.name, editing, *map(list, zip(*self.eval_prompts)), eval_key)
        held_out = held_out_warning(
            cfg.prompts.source,
            cfg.prompts.eval_source,
            self.prompts,
            [p for p, _ in self.eval_prompts],
            self.prompt_meta,
            [m for _, m in self.eval_prompts],
        )
        if held_out and dist.is_main():
            log.warning(held_out)
        # the "auto" settings (ZeRO stage, checkpointing, micro-batch, ...): the resource plan's choice for
        # the smallest GPU of the run (every rank alike), before any weight loads
        cfg, chosen = resolve_auto(cfg, self.world, self.device, evaluate_with)
        if chosen:
            log.info(chosen)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        torch.manual_seed(cfg.seed)

        # before any weight loads: its ZeRO stage decides where they go
        ds = deepspeed_config(cfg, self.world)
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        self.policy = (
            policy if policy is not None else build_policy(cfg.policy, self.device, zero_stage=stage)
        )
        self.encodings = PromptEncodings(self.policy, max_bytes=cfg.policy.prompt_cache_gib * GIB)
        self._report_truncation()
        self.reward_fn = WeightedReward([(r.name, r.weight, r.args) for r in cfg.rewards])
        self.reward_fn.load(self.device)  # now, before deepspeed.initialize: not inside the first eval
        t = cfg.train
        self.optimizer = SkippingAdamW(
            self.policy.trainable_parameters(),
            lr=t.lr,
            betas=tuple(t.betas),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        if stage == 3 and cfg.policy.lora is not None:
            keep_lora_whole(ds["zero_optimization"], self.policy.trainable_parameters())
        if stage == 3 and self.policy.deferred_placement:
            partition_zero3(self.policy.transformer, ds)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy.transformer, optimizer=self.optimizer, config=ds
        )
        trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.flops = FlopLedger(
            self.policy, self.engine
        )  # perf/tflops, perf/mfu: the calls this trainer makes
        self.peak_tflops = peak_tflops(self.device)
        # zero/<phase>_gathers: the parameter all-gathers ZeRO-3 really made (the plan's traffic, measured)
        self.gathers = (
            GatherMeter(self.engine.module, lambda: self.flops.phase, self.world) if stage == 3 else None
        )
        self.ema = EMA(trained, t.ema_decay) if t.ema_decay else None
        self.epoch = 0  # next epoch to run
        self.nonfinite_in_a_row = 0
        self.skipped_total = 0
        self.stop = SignalStop()  # SIGTERM / Ctrl-C while fit() runs: checkpoint at the next step
        self.logger = RunLogger(
            self.run_dir,
            enabled=dist.is_main(),
            tensorboard=cfg.log.tensorboard,
            wandb=cfg.log.wandb,
            config=to_dict(cfg),
        )

    def _report_truncation(self) -> None:
        """Prompts longer than policy.max_sequence_length are cut by the text encoder: say so once."""
        if not dist.is_main():
            return
        counts = self.policy.text_token_counts(self.prompts + [p for p, _ in self.eval_prompts])
        line = None if counts is None else truncation_report(counts, self.cfg.policy.max_sequence_length)
        if line:
            log.warning(line)

    def _check_stop(self) -> None:
        if dist.any_rank(self.stop.requested):
            raise Interrupted()

    @property
    def _progress(self) -> bool:
        return dist.is_main() and self.cfg.log.progress

    # --- one epoch --------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        self.flops.phase = "rollout"
        data = rollout_epoch(
            cfg,
            epoch,
            epoch_steps(cfg, epoch, self.policy),
            self.policy,
            self.engine,
            self.reward_fn,
            self.encodings,
            (self.prompts, self.prompt_meta),
            device=self.device,
            rank=self.rank,
            world=self.world,
            check_stop=self._check_stop,
            progress=self._progress,
        )
        t_rollout = time.perf_counter() - t0
        adv = epoch_advantages(data, cfg.train, self.device, rank=self.rank)
        synchronize(self.device)
        t1 = time.perf_counter()
        self.flops.phase = "update"
        # A stop waits for the end of the update (see fit).
        stats = run_update(
            self.engine,
            self.optimizer,
            self.policy,
            data,
            adv.local,
            cfg.train,
            epoch=epoch,
            seed=cfg.seed,
            rank=self.rank,
            progress=self._progress,
            after_optimizer_step=lambda skipped: self._after_optimizer_step(epoch, skipped),
        )
        train_metrics = stats.metrics() if stats is not None else {}  # reads the device: synchronises
        t_update = time.perf_counter() - t1
        rewards = adv.rewards
        metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False))}
        for name, comp in data.components.items():
            metrics[f"reward/{name}/mean"] = float(dist.all_gather_cat(comp).mean())
        metrics.update(train_metrics)
        metrics.update(
            {
                "train/zero_std_frac": float(adv.zero_std_frac),
                "train/skipped_steps": float(self.skipped_total),
                "train/trained_steps": float(len(data.sampling.trained)),
                "time/rollout_s": t_rollout - data.reward_time,
                # decode + waiting for scores: what overlapping did not hide
                "time/reward_s": data.reward_time,
                # the reward calls' own time, on their worker thread
                "time/reward_busy_s": data.reward_busy_time,
                "time/update_s": t_update,  # includes the recompute
                "time/recompute_s": stats.recompute_s if stats is not None else 0.0,
                "time/epoch_s": time.perf_counter() - t0,
                "perf/images_per_s": rewards.numel() / max(time.perf_counter() - t0, 1e-9),
                "memory/peak_gib": peak_memory_gib(self.device),
            }
        )
        metrics.update(
            perf_metrics(
                self.flops.take(),
                {"rollout": metrics["time/rollout_s"], "update": t_update},
                self.peak_tflops,
            )
        )
        metrics.update(self.gathers.take() if self.gathers else {})
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
                    "non-finite loss or gradient and were skipped (train.max_nonfinite_steps). Lower "
                    "train.lr, "
                    "check the rewards for NaN/inf, or use fp32 (policy.dtype)."
                )
        else:
            self.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update()

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """eval/<reward> and eval/diversity of the fixed eval set (``fastcps.evaluation.evaluate``)."""
        return evaluate(
            self.cfg,
            step,
            self.policy,
            self.engine,
            self.reward_fn,
            self.encodings,
            self.eval_prompts,
            ema=self.ema,
            logger=self.logger,
            device=self.device,
            rank=self.rank,
            world=self.world,
        )

    def _timed_evaluate(self, step: int) -> dict[str, float]:
        self.flops.take()  # anything counted before belongs to the epoch's metrics, already logged
        self.flops.phase, t0 = "eval", time.perf_counter()
        out = self.evaluate(step)  # ends with an all-reduce of the sums: the device's work is done
        out.update(
            perf_metrics(self.flops.take(), {"eval": time.perf_counter() - t0}, self.peak_tflops, total=False)
        )
        out.update(self.gathers.take() if self.gathers else {})
        return out

    # --- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.stop.install()
        last: dict[str, float] = {}
        try:
            if self.epoch == 0 and cfg.eval.every:
                last = self._timed_evaluate(0)
                self.logger.scalars(last, 0)
                log.info("base model: %s", metrics_line(last))
            for epoch in range(self.epoch, cfg.train.num_epochs):
                metrics = self.run_epoch(epoch)
                self.epoch = epoch + 1
                if cfg.eval.every and (
                    self.epoch % cfg.eval.every == 0 or self.epoch == cfg.train.num_epochs
                ):
                    metrics.update(self._timed_evaluate(self.epoch))
                self.logger.scalars(metrics, self.epoch)
                # the first epoch ran under the loading timeout (its first calls compile the fused ops and
                # the kernels, the base model's eval runs before it); from here on a stuck collective ends
                # the run after step_timeout_s
                dist.set_collective_timeout(cfg.distributed.step_timeout_s)
                last = metrics
                log.info("epoch %d/%d: %s", self.epoch, cfg.train.num_epochs, metrics_line(metrics))
                if (
                    cfg.checkpoint.every
                    and self.epoch % cfg.checkpoint.every == 0
                    and self.epoch < cfg.train.num_epochs
                ):
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
            log.info(
                "interrupted: checkpoint %s; resume with --resume %s (it starts at epoch %d)",
                self.run_dir / "checkpoints" / tag,
                self.run_dir,
                self.epoch + 1,
            )
        finally:
            self.stop.restore()
            if dist.is_main():
                plot_reward_curve(self.run_dir)
            self.logger.close()
        return last

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped_total": self.skipped_total,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.skipped_total = int(state["skipped_total"])

    @_under_load_timeout
    def save_checkpoint(self, tag: str, periodic: bool = False) -> Path:
        return ckpt.save_checkpoint(
            self.engine,
            self.run_dir,
            tag,
            {"trainer": self.state_dict()},
            epoch=self.epoch,
            ema=self.ema,
            policy_name=self.cfg.policy.name,
            lora=self.policy.lora,
            keep=self.cfg.checkpoint.keep if periodic else None,
        )

    def load_checkpoint(self, run_dir: Path) -> None:
        client = ckpt.load_checkpoint(self.engine, run_dir, ema=self.ema, lora=self.policy.lora)
        self.load_state_dict(client["trainer"])
        if dist.is_main():
            ckpt.set_aside_later_metrics(run_dir, self.epoch)
