"""The eval of a run: ODE samples of the fixed eval set, scored by the run's rewards (``Trainer.evaluate``
calls it at epoch 0, every ``eval.every`` epochs and at the end). A function of its own, like the epoch's
halves (``fastcps.rollout.rollout_epoch``, ``fastcps.update.run_update``), so the resource plan can run it
on stand-ins without a Trainer."""

from __future__ import annotations

import contextlib
import math

import torch

from fastcps import distributed as dist
from fastcps.rollout import eval_noise, module_mode, sample, sampling_steps, select, whole_model


@torch.no_grad()
def evaluate(
    cfg,
    step: int,
    policy,
    engine,
    reward_fn,
    encodings,
    eval_prompts: list[tuple[str, dict]],
    *,
    ema,
    logger,
    device: torch.device,
    rank: int,
    world: int,
) -> dict[str, float]:
    """ODE samples of the fixed eval set: eval/<reward> and eval/diversity (mean pairwise L2
    distance between the images of one prompt: the guard against mode collapse).

    Whole prompts are batched, up to ``train.rollout_batch_size`` images per call (K when K is
    larger). Prompt p's images start from ``eval_noise(seed, p)`` and each image's ODE trajectory is
    its own, so batching changes no value beyond the matmul reduction order of a wider batch. Every
    rank runs the same calls: ranks whose share is short repeat the last prompt (sampled, not
    scored), since ZeRO-3 gathers parameters collectively in every forward."""
    e = cfg.eval
    k = e.images_per_prompt
    n_eval = len(eval_prompts)
    per_rank = math.ceil(n_eval / world)  # equal forwards on every rank (ZeRO-3)
    mine = [i * world + rank for i in range(per_rank)]
    per_call = max(1, cfg.train.rollout_batch_size // k)  # whole prompts per sampling call
    sampling = sampling_steps("ode", None, policy.sigmas(e.num_steps or cfg.sampler.num_steps, device="cpu"))
    sampling = sampling.to(device)
    sums: dict[str, float] = {}
    div_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_prompts, n_images = 0, 0
    shown = []  # the first prompts' images, for the log
    # encoded before the gather: the text encoders (offload_frozen) never sit beside the whole model
    rows = [eval_prompts[min(p, n_eval - 1)] for p in mine for _ in range(k)]
    cond, index = encodings.for_prompts([p for p, _ in rows], device, [m for _, m in rows])
    whole = whole_model(engine, cfg.whole_model_sampling is True)  # ZeRO-3: one gather
    # eval mode once for the whole eval (``sample`` would switch per call), as the stock pipelines sample
    with (
        ema.applied() if ema else contextlib.nullcontext(),
        whole,
        module_mode(engine, False),
    ):
        for lo in range(0, per_rank, per_call):
            chunk = mine[lo : lo + per_call]
            pairs = [eval_prompts[min(p_idx, n_eval - 1)] for p_idx in chunk]
            x1 = torch.cat([eval_noise(policy, e.seed, p_idx, k, device) for p_idx in chunk])
            conds = select(cond, index[lo * k : (lo + len(chunk)) * k])
            images = policy.decode(sample(policy, engine, conds, x1, sampling).final)
            real = [j for j, p_idx in enumerate(chunk) if p_idx < n_eval]
            if not real:
                continue
            rows = torch.cat([torch.arange(j * k, (j + 1) * k) for j in real]).to(images.device)
            scored = images[rows]
            r = reward_fn(
                scored,
                [pairs[j][0] for j in real for _ in range(k)],
                [pairs[j][1] for j in real for _ in range(k)],
            )  # returns CPU tensors
            for i, j in enumerate(real):
                own = slice(i * k, (i + 1) * k)
                for name, comp in r.components.items():  # per prompt, in prompt order: the sums of
                    sums[name] = sums.get(name, 0.0) + float(comp[own].sum())  # one at a time
                if k > 1:
                    div_sum += torch.pdist(scored[own].reshape(k, -1).float()).mean()
                n_prompts += 1
                n_images += k
                if len(shown) < 4:
                    shown.append(scored[own])
    names = [n for n, _, _ in reward_fn.parts]
    vec = torch.tensor(
        [sums.get(n, 0.0) for n in names] + [float(div_sum), n_prompts, n_images], dtype=torch.float64
    )
    vec = dist.all_reduce(vec)
    out = {f"eval/{n}": float(vec[i] / vec[-1]) for i, n in enumerate(names)}
    out["eval/diversity"] = float(vec[len(names)] / vec[len(names) + 1])
    every = cfg.log.images_every
    if shown and (step == 0 or (every and step % every == 0) or step == cfg.train.num_epochs):
        logger.images("eval/images", torch.cat(shown), step)
    return out
