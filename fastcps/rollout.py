"""Rollout: sample trajectories with any registered sampler and keep what the update needs.

Which steps are stochastic and which are trained is decided once per epoch (``sampling_steps``): every
step, or a MixGRPO-style window with the ODE outside it; of the stochastic steps that inject noise
(s > 0: CPS's last step does not), the first ``timestep_fraction`` are trained and stored in fp32.

Devices. The steps' coefficients are computed and validated on the CPU from the CPU schedule (Python
values, no GPU involved) and moved to the model's device once per epoch (``SamplingSteps.to``); prompt
encodings live in host memory and an epoch's distinct prompts move to the device once
(``PromptEncodings.for_prompts``). Inside a step nothing leaves the device and nothing waits for it.
"""

from __future__ import annotations

import contextlib
import sys
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from fastcps.conditioning import PromptEncodings, select  # noqa: F401 (imported from here by others)
from fastcps.logger import progress as progress_bar
from fastcps.ops.cps_step import cps_step
from fastcps.reward_worker import RewardWorker
from fastcps.runtime import derive_seed, synchronize, to_device
from fastcps.samplers import StepCoeffs, step_coeffs


@contextlib.contextmanager
def module_mode(model, training: bool):
    """The trained module in train (``training``) or eval mode for the block, back in its previous mode
    after. Sampling (the rollout, the eval, ``fastcps.sample``) runs in eval mode as the stock pipelines
    and flow_grpo do (``pipeline.transformer.eval()`` before sampling); the update's forwards (training,
    old-log-prob recompute, the KL reference of a LoRA policy: the same module with its adapters off) in
    train mode (flow_grpo: ``.train()`` before its training loop). ``model`` is the transformer or the
    DeepSpeed engine around it (whose own ``train`` sets only its module's flags, so the module's are
    read); objects that are no module (the plan's counting stand-in) are left alone. Switching walks
    every submodule (FLUX.1-dev with LoRA: 4699), so it happens only when the mode changes: nested blocks
    of the same mode cost a flag read."""
    module = getattr(model, "module", model)
    if not isinstance(module, torch.nn.Module) or module.training == training:
        yield
        return
    module.train(training)
    try:
        yield
    finally:
        module.train(not training)


@contextlib.contextmanager
def whole_model(model, enabled: bool):
    """The sampling loops' weights: with ``enabled`` and a ZeRO-3 engine, every partitioned parameter is
    gathered once for the whole block (DeepSpeed's ``unwrap_model_for_generation``: ``GatheredParameters``
    and the engine's fetch/release hooks taken off until the block ends), instead of each module's at
    each forward. The plan's counting stand-in (``model.whole_model``) records it instead."""
    if not enabled:
        yield
        return
    own = getattr(model, "whole_model", None)
    if own is not None:
        with own():
            yield
        return
    if getattr(model, "zero_optimization_stage", lambda: 0)() != 3:
        yield
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    gathered = unwrap_model_for_generation(model)
    gathered.__enter__()
    try:
        yield
    except BaseException:
        gathered.__exit__(*sys.exc_info())  # re-partitions; DeepSpeed's code puts the hooks back only
        offload = getattr(model.optimizer, "parameter_offload", model.optimizer)  # on a normal exit
        offload._register_deepspeed_module(offload.module)
        raise
    gathered.__exit__(None, None, None)


class SamplingSteps(NamedTuple):
    stochastic: list[bool]  # per step: the sampler's step (True) or the ODE step (False)
    trained: list[int]  # step indices stored and trained, in order
    coeffs: list[StepCoeffs]  # per step, fp32 of shape (1,): on the CPU until ``to(device)``
    sigmas: torch.Tensor  # (T + 1,) fp32 schedule: on the CPU until ``to(device)``

    def to(self, device) -> "SamplingSteps":
        """The same steps with their tensors on ``device``: one small copy per epoch."""
        return self._replace(
            coeffs=[StepCoeffs(*(to_device(t, device) for t in c)) for c in self.coeffs],
            sigmas=to_device(self.sigmas, device),
        )


def sampling_steps(
    sampler: str,
    eta,
    sigmas: torch.Tensor,
    *,
    timestep_fraction: float = 1.0,
    window_size: int | None = None,
    window_start: int = 0,
    logprob=None,
    kl=None,
) -> SamplingSteps:
    """The epoch's steps and their coefficients, computed and validated on the CPU from the schedule's
    values (a device schedule is copied once); ``.to(device)`` moves the result."""
    sigmas = sigmas.detach().to("cpu", torch.float32)
    n = len(sigmas) - 1
    if window_size is None:
        stochastic = [True] * n
    else:
        if not 0 <= window_start <= n - window_size:
            raise ValueError(
                f"sde window [{window_start}, {window_start + window_size}) does not fit {n} steps"
            )
        stochastic = [window_start <= i < window_start + window_size for i in range(n)]
    coeffs, noisy = [], []
    for i in range(n):
        name = sampler if stochastic[i] else "ode"
        c = step_coeffs(name, sigmas[i], sigmas[i + 1], eta, sigma_max=sigmas[1], logprob=logprob, kl=kl)
        coeffs.append(c)
        if stochastic[i] and float(c.s[0]) > 0:  # a step without noise has no policy gradient: never trained
            noisy.append(i)
    k = max(1, math.ceil(timestep_fraction * len(noisy))) if noisy else 0
    return SamplingSteps(stochastic, noisy[:k], coeffs, sigmas)


class Trajectory(NamedTuple):
    final: torch.Tensor  # (B, *latent) fp32 x at σ = 0
    x_t: torch.Tensor  # (B, J, *latent) fp32 latents before each trained step
    x_next: torch.Tensor  # (B, J, *latent) fp32 latents after it
    log_prob: torch.Tensor  # (B, J) fp32 rollout log-probs


@torch.no_grad()
def sample(
    policy,
    model,
    cond,
    x: torch.Tensor,
    sampling: SamplingSteps,
    *,
    step_seeds: list[int] | None = None,
    first_index: int = 0,
) -> Trajectory:
    """Run all steps from x = x1 with ``sampling``'s schedule and coefficients (on ``x``'s device), the
    model in eval mode (``module_mode``). Noise of step i, sample b comes from Philox with seed
    ``step_seeds[i]`` and counter ``(first_index + b)·N + n``: the same images whatever the batch split or
    the number of processes."""
    with module_mode(model, False):
        return _sample(policy, model, cond, x, sampling, step_seeds, first_index)


def _sample(policy, model, cond, x, sampling, step_seeds, first_index) -> Trajectory:
    b = x.shape[0]
    numel = x[0].numel()
    trained = set(sampling.trained)
    xs, nexts, lps = [], [], []
    x = x.float()
    for i in range(len(sampling.coeffs)):
        v = policy.velocity(model, x, sampling.sigmas[i].expand(b), cond)
        c = sampling.coeffs[i]
        if step_seeds is None:
            out = cps_step(x, v.float(), c, noise=torch.randn_like(x))
        else:
            out = cps_step(x, v.float(), c, seed=step_seeds[i], offset=first_index * numel)
        if i in trained:
            xs.append(x)
            nexts.append(out.prev_sample)
            lps.append(out.log_prob)
        x = out.prev_sample
    empty = x.new_zeros((b, 0, *x.shape[1:]))
    return Trajectory(
        x,
        torch.stack(xs, 1) if xs else empty,
        torch.stack(nexts, 1) if nexts else empty,
        torch.stack(lps, 1) if lps else x.new_zeros((b, 0)),
    )


@dataclass
class EpochData:
    """One rank's rollout of one epoch: everything the update reads lives on the model's device,
    except the rewards (validated on the CPU where they were computed; the advantages derived from
    them move to the device once, see ``fastcps.update.epoch_advantages``)."""

    prompts: list[str]  # this rank's samples' prompts
    group: torch.Tensor  # (n,) int64, CPU: the prompt slot of each sample (its advantage group)
    cond: dict[str, torch.Tensor]  # encodings of this rank's distinct prompts, device
    cond_index: torch.Tensor  # (n,) int64, device: each sample's row of ``cond``
    sampling: SamplingSteps  # schedule and coefficients on the device
    x_t: torch.Tensor  # (n, J, *latent) fp32, device
    x_next: torch.Tensor  # (n, J, *latent) fp32, device
    log_prob: torch.Tensor  # (n, J) fp32, device
    reward: torch.Tensor  # (n,) fp32, CPU
    components: dict[str, torch.Tensor]  # name -> (n,) fp32, CPU
    preview: torch.Tensor | None  # the first rollout batch's images (device)
    reward_time: float  # decode + waiting for scores: the rollout time scoring did not hide
    reward_busy_time: float = 0.0  # the reward calls' own wall time (on the worker thread when overlapped)


def epoch_slots(
    cfg, epoch: int, num_prompts: int, rank: int, world: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(chosen prompt of each slot, this rank's slots, index of its first sample): K copies of each
    chosen prompt, shuffled over all ranks, so a group may span ranks."""
    t = cfg.train
    rng = np.random.default_rng(derive_seed(cfg.seed, epoch, 1))
    chosen = rng.choice(num_prompts, size=t.prompts_per_epoch, replace=t.prompts_per_epoch > num_prompts)
    slots = np.repeat(np.arange(t.prompts_per_epoch), t.images_per_prompt)
    slots = slots[rng.permutation(len(slots))]
    per_rank = len(slots) // world
    return chosen, slots[rank * per_rank : (rank + 1) * per_rank], rank * per_rank


def window_start(cfg, epoch: int) -> int:
    s = cfg.sampler
    if s.sde_window_size is None:
        return 0
    lo, hi = s.sde_window_range or (0, s.num_steps - s.sde_window_size + 1)
    return int(np.random.default_rng(derive_seed(cfg.seed, epoch, 11)).integers(lo, hi))


def epoch_steps(cfg, epoch: int, policy) -> SamplingSteps:
    """The epoch's sampling steps on the CPU (host values: run it outside any fake-tensor mode)."""
    s = cfg.sampler
    return sampling_steps(
        s.name,
        s.eta,
        policy.sigmas(s.num_steps, device="cpu"),
        timestep_fraction=s.timestep_fraction,
        window_size=s.sde_window_size,
        window_start=window_start(cfg, epoch),
        logprob=s.logprob,
        kl=s.kl,
    )


def initial_noise(policy, seed_parts: tuple, indices: list[int], device) -> torch.Tensor:
    """x1 for global sample indices, each from its own seeded CPU generator: the batch split, the
    number of processes and the device do not change a sample's noise."""
    shape = policy.latent_shape()
    out = [
        torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(*seed_parts, i)))
        for i in indices
    ]
    return to_device(torch.stack(out), device)


def eval_prompt_set(cfg) -> tuple[list[str], list[dict]]:
    """The run's fixed eval set: ``eval.num_prompts`` spread evenly over ``prompts.eval_source`` (else
    ``prompts.source``), each prompt once (GenEval's test set lists each prompt 4 times: 16 picks spread over
    the repeats were 4 prompts, 4 times each; an edit prompt is its instruction with its source images): one
    per digit on the toy. The trainer and ``fastcps.sample`` both use it."""
    from fastcps.prompts import load_prompts, prompt_identity

    source, key = (
        (cfg.prompts.eval_source, "prompts.eval_source")
        if cfg.prompts.eval_source
        else (cfg.prompts.source, "prompts.source")
    )
    pool, meta = load_prompts(source, key)
    # each prompt's first row; an edit row is its instruction on its image(s): counting_edit:test gives one
    # instruction to several images (112 rows, 99 instructions), each pair a prompt of its own
    first = {prompt_identity(p, m): i for i, (p, m) in reversed(list(enumerate(zip(pool, meta))))}
    keep = sorted(first.values())
    pool, meta = [pool[i] for i in keep], [meta[i] for i in keep]
    n = min(cfg.eval.num_prompts, len(pool))
    pick = [i * len(pool) // n for i in range(n)]
    return [pool[i] for i in pick], [meta[i] for i in pick]


def eval_noise(policy, seed: int, prompt_index: int, k: int, device) -> torch.Tensor:
    """x1 of one eval prompt's K images (``Trainer.evaluate``; ``fastcps.sample`` reproduces it)."""
    return initial_noise(policy, (seed, 5), [prompt_index * k + i for i in range(k)], torch.device(device))


def rollout_epoch(
    cfg,
    epoch: int,
    sampling: SamplingSteps,
    policy,
    model,
    reward_fn,
    encodings: PromptEncodings,
    prompt_pool: tuple[list[str], list[dict]],
    *,
    device,
    rank: int = 0,
    world: int = 1,
    check_stop: Callable[[], None] = lambda: None,
    progress: bool = False,
    overlap_rewards: bool = True,
) -> EpochData:
    """Sample this rank's images of ``epoch`` with ``sampling`` (``epoch_steps``, on the CPU), decode and
    score them, keep the trained steps.

    ``reward_fn(images, prompts, metadata)`` returns a ``RewardOutput`` of CPU fp32 tensors (checked
    finite there); ``images`` are the decoded batch on the model's device. With ``overlap_rewards`` a
    rollout batch is scored on one worker thread while the next batch denoises (as flow_grpo does:
    scripts/train_flux.py submits ``reward_fn`` to a ``ThreadPoolExecutor`` and reads the futures after
    sampling); batch i's scores are read after batch i+1 is sampled and decoded, before batch i+1 is
    submitted, so at most one batch is being scored and one batch's images wait beside the sampler. The
    scores and their order are those of the synchronous loop (``overlap_rewards=False``); a reward's
    exception re-raises here, with its traceback, at most one batch later. One host synchronisation
    per rollout batch: reading the rewards.

    ``reward_time`` is the rollout's wall time spent on decoding and on waiting for scores: what the
    overlap did not hide (synchronously: all of the decode and scoring time), so that the sampling time
    stays the rollout's time minus ``reward_time``. ``reward_busy_time`` is the scoring's own wall
    time on its thread, hidden or not.

    The worker runs the reward on the caller's CUDA device and current stream (a thread starts on
    device 0 and the default stream): the reward's kernels queue behind the decode that made its
    images and interleave with the next batch's sampling kernels on that stream, so what overlaps is
    its host work (image preprocessing, tokenising, OCR / detection, copies back) and the sampler's
    host-side launches, not GPU work; the reward model's GPU work still shares the GPU."""
    t = cfg.train
    pool, pool_meta = prompt_pool
    chosen, mine, lo = epoch_slots(cfg, epoch, len(pool), rank, world)
    prompts = [pool[chosen[g]] for g in mine]
    meta = [pool_meta[chosen[g]] for g in mine]
    cond, cond_index = encodings.for_prompts(prompts, device, meta)

    sampling = sampling.to(device)
    step_seeds = [derive_seed(cfg.seed, epoch, 2, i) for i in range(len(sampling.coeffs))]
    xs, nexts, lps, scores = [], [], [], []
    preview, t_reward = None, 0.0
    bs = t.rollout_batch_size
    scorer = RewardWorker(reward_fn, enabled=overlap_rewards)
    try:
        # under ZeRO-3 the sampler's forwards gather the weights once, when that fits (the plan); eval
        # mode once for the epoch (``sample`` would switch per batch)
        with whole_model(model, cfg.whole_model_sampling is True), module_mode(model, False):
            for start in progress_bar(
                range(0, len(mine), bs),
                desc=f"epoch {epoch + 1} rollout",
                unit="images",
                unit_scale=bs,
                enabled=progress,
            ):
                batch = slice(start, start + bs)
                idx = list(range(lo + start, lo + start + bs))
                x1 = initial_noise(policy, (cfg.seed, epoch, 3), idx, device)
                traj = sample(
                    policy,
                    model,
                    select(cond, cond_index[batch]),
                    x1,
                    sampling,
                    step_seeds=step_seeds,
                    first_index=idx[0],
                )
                synchronize(device)  # the reward reads values next: keep the sampling's time out of its timer
                t0 = time.perf_counter()
                images = policy.decode(traj.final)
                scores.extend(scorer.collect())  # the previous batch's scores (raises its error)
                scorer.submit(images, prompts[batch], meta[batch])  # synchronously: scored here
                t_reward += time.perf_counter() - t0
                preview = images if preview is None else preview
                xs.append(traj.x_t)
                nexts.append(traj.x_next)
                lps.append(traj.log_prob)
                check_stop()
        t0 = time.perf_counter()
        scores.extend(scorer.collect())
        t_reward += time.perf_counter() - t0
    finally:
        scorer.close()
    return EpochData(
        prompts=prompts,
        group=torch.as_tensor(mine, dtype=torch.long),
        cond=cond,
        cond_index=cond_index,
        sampling=sampling,
        x_t=torch.cat(xs),
        x_next=torch.cat(nexts),
        log_prob=torch.cat(lps),
        reward=torch.cat([r.total for r in scores]),
        components={k: torch.cat([r.components[k] for r in scores]) for k in scores[0].components},
        preview=preview,
        reward_time=t_reward,
        reward_busy_time=scorer.busy_time,
    )
