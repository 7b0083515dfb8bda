"""The GRPO trainer. One epoch, in DESIGN.md's order:

    prompts -> cached encodings -> rollout (any sampler) -> decode -> rewards -> advantages (groups
    across ranks) -> update (fused log-prob/KL op, clipped GRPO loss + beta*KL, DeepSpeed) -> metrics

Nothing here knows which model it trains: the policy adapter answers every model question.
Every random choice is derived from (seed, epoch, ...), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcps import distributed as dist
from fastcps.config import RunConfig
from fastcps.configlib import to_dict
from fastcps.grpo import compute_advantages, grpo_loss
from fastcps.logger import RunLogger, plot_reward_curve
from fastcps.ops.cps_logprob_kl import cps_logprob_kl
from fastcps.policies import build_policy
from fastcps.prompts import load_prompts
from fastcps.rewards import WeightedReward
from fastcps.rollout import StepPlan, coeffs_for_step, derive_seed, plan_steps, sample


class Interrupted(Exception):
    """SIGTERM or Ctrl-C arrived: checkpoint and leave."""


class NonFiniteStop(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite on some rank (or that the trainer
    flagged), and says so. DeepSpeed calls ``step`` on its own (possibly partitioned) fp32 params."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.force_skip = False
        self.last_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        finite = all(bool(torch.isfinite(p.grad).all()) for g in self.param_groups for p in g["params"]
                     if p.grad is not None)
        self.last_skipped = dist.any_rank(self.force_skip or not finite)
        if self.last_skipped:
            return None
        return super().step(closure)


def _local_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's storage of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    """Exponential moving average of the trained weights, kept per rank on the local partitions."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [_local_tensor(p).detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(_local_tensor(p).float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        saved = [_local_tensor(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            _local_tensor(p).copy_(s)
        try:
            yield
        finally:
            for b, p in zip(saved, self.params):
                _local_tensor(p).copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.shadow = [t.clone() for t in state["shadow"]]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def save_diffusers_lora(state: dict[str, torch.Tensor], peft_config, path: Path) -> None:
    """peft adapter weights as stock diffusers writes them (``save_lora_weights``): keys
    ``transformer.<module>.lora_A.weight`` and the adapter's LoraConfig (r, lora_alpha, targets) in the
    ``lora_adapter_metadata`` header. Without that header ``load_lora_weights`` assumes alpha = r and
    would scale the update by r / alpha (off by 2x for r 64, alpha 128)."""
    from safetensors.torch import save_file

    tensors = {"transformer." + n.replace(".default", ""): t for n, t in state.items()}
    meta = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        meta, indent=2, sort_keys=True, default=str)})


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        import deepspeed

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world = dist.rank(), dist.world()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.prompts, self.prompt_meta = load_prompts(cfg.prompts.source)
        if cfg.prompts.eval_source:
            eval_pool, eval_meta = load_prompts(cfg.prompts.eval_source)
        else:
            eval_pool, eval_meta = self.prompts, self.prompt_meta
        n = min(cfg.eval.num_prompts, len(eval_pool))
        pick = [i * len(eval_pool) // n for i in range(n)]  # evenly spread: one per digit on the toy
        self.eval_prompts = [(eval_pool[i], eval_meta[i]) for i in pick]

        self.policy = build_policy(cfg.policy, self.device)
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
        self._cond_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._stop_signal = False
        self.logger = RunLogger(self.run_dir, enabled=dist.is_main(), tensorboard=cfg.log.tensorboard,
                                wandb=cfg.log.wandb, config=to_dict(cfg))

    # --- set-up -----------------------------------------------------------------------------------
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

    def _cond(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Encodings, computed once per prompt and cached in host memory: FLUX's T5 states are 4 MiB
        a prompt, so a whole prompt set would not fit beside the model; a batch moves over per call."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if todo:
            enc = self.policy.encode(todo)
            for i, p in enumerate(todo):
                self._cond_cache[p] = {k: v[i:i + 1].detach().to("cpu").clone() for k, v in enc.items()}
        keys = self._cond_cache[prompts[0]]
        return {k: torch.cat([self._cond_cache[p][k] for p in prompts]).to(self.device, non_blocking=True)
                for k in keys}

    def _initial_noise(self, seed_parts: tuple, indices: list[int]) -> torch.Tensor:
        """x1 for global sample indices, each from its own seeded generator: the batch split and the
        number of processes do not change a sample's noise."""
        shape = self.policy.latent_shape()
        out = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(*seed_parts, i)))
               for i in indices]
        return torch.stack(out).to(self.device)

    def _plan(self, epoch: int, sigmas: torch.Tensor) -> StepPlan:
        s = self.cfg.sampler
        start = 0
        if s.sde_window_size is not None:
            lo, hi = s.sde_window_range or (0, s.num_steps - s.sde_window_size + 1)
            start = int(np.random.default_rng(derive_seed(self.cfg.seed, epoch, 11)).integers(lo, hi))
        return plan_steps(s.name, s.eta, sigmas, timestep_fraction=s.timestep_fraction,
                          window_size=s.sde_window_size, window_start=start, logprob=s.logprob)

    def _check_stop(self) -> None:
        if dist.any_rank(self._stop_signal):
            raise Interrupted()

    # --- one epoch --------------------------------------------------------------------------------
    def rollout(self, epoch: int):
        cfg, t = self.cfg, self.cfg.train
        rng = np.random.default_rng(derive_seed(cfg.seed, epoch, 1))
        replace = t.prompts_per_epoch > len(self.prompts)
        chosen = rng.choice(len(self.prompts), size=t.prompts_per_epoch, replace=replace)
        # K copies of each prompt, shuffled over all ranks: a group may span ranks.
        slots = np.repeat(np.arange(t.prompts_per_epoch), t.images_per_prompt)
        slots = slots[rng.permutation(len(slots))]
        per_rank = len(slots) // self.world
        lo = self.rank * per_rank
        mine = slots[lo:lo + per_rank]
        prompts = [self.prompts[chosen[g]] for g in mine]
        meta = [self.prompt_meta[chosen[g]] for g in mine]

        sigmas = self.policy.sigmas(cfg.sampler.num_steps, device=self.device)
        plan = self._plan(epoch, sigmas)
        step_seeds = [derive_seed(cfg.seed, epoch, 2, i) for i in range(len(sigmas) - 1)]
        finals, xs, nexts, lps, rewards, comps = [], [], [], [], [], []
        t_reward = 0.0
        bs = t.rollout_batch_size
        bar = tqdm(range(0, per_rank, bs), desc=f"epoch {epoch} rollout", disable=not (dist.is_main() and cfg.log.progress),
                   leave=False)
        for start in bar:
            idx = list(range(lo + start, lo + start + bs))
            cond = self._cond(prompts[start:start + bs])
            x1 = self._initial_noise((cfg.seed, epoch, 3), idx)
            traj = sample(self.policy, self.engine, cond, x1, sigmas, plan, sampler=cfg.sampler.name,
                          eta=cfg.sampler.eta, logprob=cfg.sampler.logprob, step_seeds=step_seeds,
                          first_index=idx[0])
            t0 = time.perf_counter()
            images = self.policy.decode(traj.final)
            r = self.reward_fn(images, prompts[start:start + bs], meta[start:start + bs])
            t_reward += time.perf_counter() - t0
            finals.append(images if start == 0 else None)
            xs.append(traj.x_t)
            nexts.append(traj.x_next)
            lps.append(traj.log_prob)
            rewards.append(r.total)
            comps.append(r.components)
            self._check_stop()
        return dict(
            prompts=prompts, sigmas=sigmas, plan=plan, group=torch.as_tensor(mine),
            x_t=torch.cat(xs), x_next=torch.cat(nexts), log_prob=torch.cat(lps),
            reward=torch.cat(rewards), components={k: torch.cat([c[k] for c in comps]) for k in comps[0]},
            preview=finals[0], reward_time=t_reward,
        )

    def _loss(self, data, mb: torch.Tensor, j: int, old: torch.Tensor, adv: torch.Tensor):
        cfg, t = self.cfg, self.cfg.train
        step = data["plan"].trained[j]
        sig = data["sigmas"]
        x_t, x_next = data["x_t"][mb, j], data["x_next"][mb, j]
        cond = self._cond([data["prompts"][i] for i in mb.tolist()])
        b = x_t.shape[0]
        v = self.policy.velocity(self.engine, x_t, sig[step].expand(b), cond)
        v_ref = None
        if t.beta_kl > 0:
            with torch.no_grad(), self.policy.reference(self.engine) as ref:
                v_ref = self.policy.velocity(ref, x_t, sig[step].expand(b), cond)
        c = coeffs_for_step(data["plan"], step, cfg.sampler.name, cfg.sampler.eta, sig, b, cfg.sampler.logprob)
        logp, kl = cps_logprob_kl(x_t, v, x_next, c, v_ref)
        out = grpo_loss(logp, old, adv, clip_range=t.clip_range, kl=kl if v_ref is not None else None,
                        beta_kl=t.beta_kl)
        return out, logp, v

    def _minibatches(self, n: int, epoch: int, inner: int) -> list[torch.Tensor]:
        perm = np.random.default_rng(derive_seed(self.cfg.seed, epoch, 4, inner, self.rank)).permutation(n)
        mb = self.cfg.train.minibatch_size
        return [torch.as_tensor(perm[i:i + mb]) for i in range(0, n, mb)]

    @torch.no_grad()
    def _recompute_old(self, data, minibatches) -> torch.Tensor:
        """Old log-probs from the same forward the update runs, same minibatches, same order: the
        first update's ratio is then exactly 1 (fp32)."""
        old = torch.empty_like(data["log_prob"])
        zeros = torch.zeros(self.cfg.train.minibatch_size)
        for mb in minibatches:
            for j in range(len(data["plan"].trained)):
                old[mb, j] = self._loss(data, mb, j, old[mb, j], zeros[: len(mb)])[1].detach().float().cpu()
        return old

    def update(self, data, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        t = self.cfg.train
        n_steps = len(data["plan"].trained)
        n = data["x_t"].shape[0]
        stats = {"loss": [], "kl": [], "clipfrac": []}
        ratio_dev = 0.0
        if n_steps == 0:
            return {}
        bar = tqdm(total=t.num_inner_epochs * n * n_steps // t.minibatch_size, desc=f"epoch {epoch} update",
                   disable=not (dist.is_main() and self.cfg.log.progress), leave=False)
        for inner in range(t.num_inner_epochs):
            minibatches = self._minibatches(n, epoch, inner)
            if inner == 0:
                old = self._recompute_old(data, minibatches) if t.old_logprob == "recompute" else data["log_prob"]
            for w in range(0, len(minibatches), t.gradient_accumulation_steps):
                window = minibatches[w:w + t.gradient_accumulation_steps]
                n_micro, k, bad = len(window) * n_steps, 0, False
                for mb in window:
                    for j in range(n_steps):
                        k += 1
                        self.engine.set_gradient_accumulation_boundary(k == n_micro)
                        out, _, v = self._loss(data, mb, j, old[mb, j], adv[mb])
                        nonfinite = dist.any_rank(not bool(torch.isfinite(out.loss)))
                        loss = out.loss / n_micro
                        if nonfinite:  # keep every rank's backward (ZeRO-3 hooks), contribute nothing
                            bad = True
                            loss = (torch.nan_to_num(v, 0.0, 0.0, 0.0) * 0.0).sum()
                        self.engine.backward(loss)
                        self.optimizer.force_skip = bad
                        self.engine.step()
                        if inner == 0 and w == 0:
                            ratio_dev = max(ratio_dev, float(out.ratio_dev))
                        if not nonfinite:
                            stats["loss"].append(float(out.loss.detach()))
                            stats["kl"].append(float(out.kl_mean))
                            stats["clipfrac"].append(float(out.clipfrac))
                        bar.update(1)
                        self._check_stop()
                self._after_optimizer_step(epoch)
        bar.close()
        local = torch.tensor([float(np.mean(stats[k])) if stats[k] else float("nan") for k in ("loss", "kl", "clipfrac")])
        mean = dist.all_reduce(local) / self.world
        ratio_dev = float(dist.all_reduce(torch.tensor([ratio_dev]), torch.distributed.ReduceOp.MAX)[0]) \
            if self.world > 1 else ratio_dev
        return {"train/loss": float(mean[0]), "train/kl": float(mean[1]), "train/clipfrac": float(mean[2]),
                "train/ratio_dev": ratio_dev}

    def _after_optimizer_step(self, epoch: int) -> None:
        self.optimizer.force_skip = False
        if self.optimizer.last_skipped:
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
        self.optimizer.last_skipped = False

    def run_epoch(self, epoch: int) -> dict[str, float]:
        t0 = time.perf_counter()
        data = self.rollout(epoch)
        t_rollout = time.perf_counter() - t0
        rewards = dist.all_gather_cat(data["reward"])
        groups = dist.all_gather_cat(data["group"])
        t = self.cfg.train
        adv_out = compute_advantages(rewards, groups, std=t.adv_std, clip=t.adv_clip_max,
                                     zero_std_threshold=t.zero_std_threshold)
        per_rank = data["reward"].shape[0]
        adv = adv_out.advantages[self.rank * per_rank:(self.rank + 1) * per_rank].float()
        t1 = time.perf_counter()
        train_metrics = self.update(data, adv, epoch)
        t_update = time.perf_counter() - t1
        metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False))}
        for name, comp in data["components"].items():
            metrics[f"reward/{name}/mean"] = float(dist.all_gather_cat(comp).mean())
        metrics.update(train_metrics)
        metrics.update({
            "train/zero_std_frac": float(adv_out.zero_std_frac),
            "train/skipped_steps": float(self.skipped_total),
            "train/trained_steps": float(len(data["plan"].trained)),
            "time/rollout_s": t_rollout - data["reward_time"],
            "time/reward_s": data["reward_time"],
            "time/update_s": t_update,
            "time/epoch_s": time.perf_counter() - t0,
            "perf/images_per_s": rewards.numel() / max(time.perf_counter() - t0, 1e-9),
            "memory/peak_gib": peak_memory_gib(self.device),
        })
        every = self.cfg.log.images_every
        if every and (epoch + 1) % every == 0:
            self.logger.images("rollout/images", data["preview"][:16], epoch + 1)
        return metrics

    # --- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """ODE samples of the fixed eval set: eval/<reward> and eval/diversity (mean pairwise L2
        distance between the images of one prompt: the guard against mode collapse)."""
        cfg, e = self.cfg, self.cfg.eval
        k = e.images_per_prompt
        per_rank = math.ceil(len(self.eval_prompts) / self.world)  # equal forwards on every rank (ZeRO-3)
        mine = [i * self.world + self.rank for i in range(per_rank)]
        sigmas = self.policy.sigmas(e.num_steps or cfg.sampler.num_steps, device=self.device)
        plan = StepPlan([False] * (len(sigmas) - 1), [])
        sums: dict[str, float] = {}
        div_sum, n_prompts, n_images = 0.0, 0, 0
        first_images = None
        with self.ema.applied() if self.ema else contextlib.nullcontext():
            for p_idx in mine:
                real = p_idx < len(self.eval_prompts)
                prompt, meta = self.eval_prompts[min(p_idx, len(self.eval_prompts) - 1)]
                x1 = self._initial_noise((e.seed, 5), [p_idx * k + i for i in range(k)])
                traj = sample(self.policy, self.engine, self._cond([prompt] * k), x1, sigmas, plan, sampler="ode")
                images = self.policy.decode(traj.final)
                if not real:
                    continue
                r = self.reward_fn(images, [prompt] * k, [meta] * k)
                for name, comp in r.components.items():
                    sums[name] = sums.get(name, 0.0) + float(comp.sum())
                flat = images.reshape(k, -1).float().cpu()
                div_sum += float(torch.pdist(flat).mean()) if k > 1 else 0.0
                n_prompts += 1
                n_images += k
                first_images = images if first_images is None else torch.cat([first_images, images])
        names = [n for n, _, _ in self.reward_fn.parts]
        vec = torch.tensor([sums.get(n, 0.0) for n in names] + [div_sum, n_prompts, n_images], dtype=torch.float64)
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
            self.save_checkpoint("final")
        except Interrupted:
            self.epoch = max(self.epoch, 0)
            tag = f"interrupted_epoch{self.epoch:05d}"
            # The epoch in flight is abandoned, its finished updates kept: a resume starts the next one.
            self.epoch += 1
            self.save_checkpoint(tag)
            if dist.is_main():
                print(f"[fastcps] interrupted: checkpoint {self.run_dir / 'checkpoints' / tag}; resume with "
                      f"--resume {self.run_dir}", flush=True)
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
        root = self.run_dir / "checkpoints"
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"trainer": self.state_dict()})
        if self.ema is not None:
            torch.save(self.ema.state_dict(), root / tag / f"ema_rank{self.rank}.pt")
        self.export_weights(root / tag / "policy.safetensors")
        dist.barrier()
        if dist.is_main() and periodic:
            tags = sorted(p.name for p in root.glob("epoch*") if p.is_dir())
            for old in tags[: max(0, len(tags) - self.cfg.checkpoint.keep)]:
                shutil.rmtree(root / old, ignore_errors=True)
        dist.barrier()
        return root / tag

    def export_weights(self, path: Path) -> None:
        """The trained parameters as one safetensors file, gathered from the ZeRO-3 partitions
        (collective: every rank calls it; rank 0 writes)."""
        import deepspeed
        from safetensors.torch import save_file

        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if dist.is_main():
                state = {n: p.detach().to("cpu", torch.float32).contiguous().clone() for n, p in named}
                save_file(state, str(path), metadata={"format": "fastcps-policy-weights",
                                                      "policy": self.cfg.policy.name})
                if self.policy.lora:  # diffusers' LoRA format: pipeline.load_lora_weights(folder) reads it
                    save_diffusers_lora(state, self.engine.module.peft_config["default"],
                                        path.with_name("pytorch_lora_weights.safetensors"))

    def load_checkpoint(self, run_dir: Path) -> None:
        root = Path(run_dir) / "checkpoints"
        if not (root / "latest").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no DeepSpeed checkpoint under {root} (missing 'latest')")
        path, client = self.engine.load_checkpoint(str(root))
        if path is None:
            raise RuntimeError(f"--resume {run_dir}: DeepSpeed could not load the checkpoint in {root}")
        self.load_state_dict(client["trainer"])
        tag = (root / "latest").read_text().strip()
        if dist.is_main():  # metrics logged after this checkpoint will be logged again: set them aside
            log = Path(run_dir) / "metrics.jsonl"
            if log.exists():
                rows = log.read_text().splitlines()
                keep = [r for r in rows if r.strip() and json.loads(r)["epoch"] <= self.epoch]
                if len(keep) != len([r for r in rows if r.strip()]):
                    shutil.copy(log, log.with_name(f"metrics.before_resume_epoch{self.epoch:05d}.jsonl"))
                    log.write_text("".join(r + "\n" for r in keep))
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(root / tag / f"ema_rank{self.rank}.pt"))
