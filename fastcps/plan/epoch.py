"""One epoch of the trainer counted on the trainer's own code: ``python -m fastcps.plan`` takes its
FLOPs and ZeRO traffic from here, so a pass the trainer adds or removes shows in the plan.

What runs: ``fastcps.rollout.rollout_epoch`` and ``fastcps.update.run_update`` (its old-log-prob
recompute included) for rank 0 of ``world`` with the run's config, and ``Trainer.evaluate`` (divided by
``eval.every``), with the real prompts, slots, step plans, batch layouts and accumulation windows. What
is stood in for:

- the transformer: :class:`CountingEngine` answers every velocity call with zeros and records it
  (samples, grad mode, phase); each call costs what the real transformer measured on fake tensors
  for that batch costs (``fastcps.plan.measure.TransformerMeter``: forward, autograd backward and the
  gradient-checkpoint re-forward, FLUX.1-dev's 12 B parameters at the run's text length);
- DeepSpeed: the same engine records every backward and optimizer step; ``zero_traffic`` turns the
  calls into the bytes ZeRO's collectives move, per stage;
- the latents: one element each (their size changes no call and no collective); the VAE decode:
  counted per image, its FLOPs measured on fake tensors; rewards: constant (their models' FLOPs are
  not counted: PickScore's ViT-H on an image is ~1 % of a FLUX forward's).

The velocity stand-in makes the rollout's log-probs equal the training forward's bit for bit, so the
count assumes ``run_update``'s check passes where the layout allows it (``minibatch_size ==
rollout_batch_size``); where a real run's check fails (different kernels for the two forwards), it
recomputes, and ``train/old_logprob_recomputed`` says so in its logs.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch

from fastcps.config import RunConfig
from fastcps.plan.standins import ConstantReward, CountingEngine, CountingPolicy, _Optimizer

PHASES = (
    "rollout",
    "VAE decode",
    "old log-prob recompute",
    "training forward",
    "training backward",
    "checkpoint re-forward",
    "KL reference forward",
    "eval",
)


def zero_traffic(
    counted: dict,
    *,
    stage: int,
    world: int,
    gathered_params: int,
    fetched: dict[str, int],
    trained_params: int,
    bytes_per_param: float,
    grad_bytes_per_param: float,
    gather_bytes_per_param: float | None = None,
    whole_sampling: bool = False,
) -> dict:
    """Bytes received per GPU by ZeRO's collectives in the counted epoch (ring: (N-1)/N of each full
    tensor). ZeRO-3: each forward call gathers ``fetched["forward"]`` elements and each backward
    ``fetched["backward"]`` (its re-forward of checkpointed blocks included), as
    ``measure.ModuleUses`` counted them on the real architecture: DeepSpeed gathers a module's own
    parameters at each use and releases them after it (frozen ones too); a backward skips the modules
    whose output needs no gradient. ``gathers``: the same in whole-model gathers of the
    ``gathered_params`` partitioned elements. Every backward reduce-scatters the trained gradients.
    ZeRO-2: every backward reduce-scatters the gradients, every optimizer step all-gathers the updated
    trained parameters. ``gather_bytes_per_param``: bytes a gathered parameter travels in (ZeRO++'s
    quantized weights: ~1 + scales), default ``bytes_per_param``. ``whole_sampling``
    (``whole_model_sampling``): the calls the trainer made inside ``rollout.whole_model`` fetch nothing
    and each such block gathers the whole model once."""
    ring = (world - 1) / world
    forwards = sum(n for (phase, _, _), n in counted["calls"].items() if phase != "training backward")
    wholes = 0.0
    if whole_sampling:
        forwards -= sum(counted.get("whole_calls", {}).values())
        wholes = sum(counted.get("whole_gathers", {}).values())
    backwards = sum(n for (phase, _, _), n in counted["calls"].items() if phase == "training backward")
    grads = backwards * trained_params * grad_bytes_per_param * ring
    if stage >= 3:
        elements = forwards * fetched["forward"] + backwards * fetched["backward"] + wholes * gathered_params
        gathered = elements * (gather_bytes_per_param or bytes_per_param) * ring
        return {
            "parameter all-gather": gathered,
            "gradient reduce-scatter": grads,
            "total": gathered + grads,
            "gathers": elements / gathered_params if gathered_params else 0.0,
        }
    gathered = counted["optimizer_steps"] * trained_params * bytes_per_param * ring
    return {
        "parameter all-gather": gathered,
        "gradient reduce-scatter": grads,
        "total": gathered + grads,
        "gathers": 0,
    }


def count_epoch(
    cfg: RunConfig, world: int, *, latent_shape: tuple, sigmas, cfg_mult: int, evaluate, epoch: int = 0
) -> dict:
    """Calls of one epoch on rank 0 (every rank runs the same calls: ZeRO-3 needs it). Returns
    {"calls": {(phase, kind, samples): n}, "vae": {images: calls}, "optimizer_steps", "images_per_rank",
    "encodes": {(phase, inside a whole-model gather): prompts}};
    eval's calls are divided by ``eval.every`` (it runs every that many epochs). ``latent_shape``:
    the stand-in's latents (their size changes no call; the plan passes one element). ``evaluate``: the
    trainer's eval on given parts (``fastcps.trainer.evaluate_with``; passed in: the trainer imports the
    plan, not the other way round)."""
    from fastcps.prompts import load_prompts
    from fastcps.conditioning import PromptEncodings
    from fastcps.rollout import epoch_steps, rollout_epoch
    from fastcps.update import epoch_advantages, run_update

    # counted with the sampling loops' whole-model gathers on: zero_traffic prices both ways
    cfg = cfg.model_copy(update={"whole_model_sampling": True})
    vae: Counter = Counter()
    engine = CountingEngine()
    policy = CountingPolicy(latent_shape, sigmas, cfg_mult, vae, engine)
    encodings = PromptEncodings(policy)
    cpu = torch.device("cpu")
    data = rollout_epoch(
        cfg,
        epoch,
        epoch_steps(cfg, epoch, policy),
        policy,
        engine,
        ConstantReward(),
        encodings,
        load_prompts(cfg.prompts.source),
        device=cpu,
        rank=0,
        world=world,
    )
    # every reward is equal here: spread the advantages so that the loss is not trivially zero
    adv = epoch_advantages(data, cfg.train, cpu).local + torch.as_tensor(
        np.linspace(-1, 1, data.reward.numel()), dtype=torch.float32
    )
    engine.phase = "update"
    run_update(engine, _Optimizer(), policy, data, adv, cfg.train, epoch=epoch, seed=cfg.seed, rank=0)
    out = {
        "calls": dict(engine.calls),
        "vae": dict(vae),
        "optimizer_steps": engine.optimizer_steps,
        "images_per_rank": int(data.reward.numel()),
        "whole_gathers": dict(engine.whole),
        "whole_calls": dict(engine.whole_calls),
        "encodes": policy.encodes,  # (phase, inside a whole-model gather) -> prompts, eval's included
    }
    e = cfg.eval
    if e.every:
        engine.calls.clear()
        engine.whole.clear()
        engine.whole_calls.clear()
        vae.clear()
        engine.phase = "eval"
        # a fresh cache: the eval's own encodings are seen whether or not the rollout's cached them
        _evaluate(evaluate, cfg, world, policy, engine, PromptEncodings(policy))
        for field, counts in (
            ("calls", engine.calls),
            ("whole_gathers", engine.whole),
            ("whole_calls", engine.whole_calls),
        ):
            for key, n in counts.items():
                out[field][key] = out[field].get(key, 0) + n / e.every
        out["vae_eval"] = {key: n / e.every for key, n in vae.items()}
    return out


def counted_epoch(cfg: RunConfig, world: int, model) -> dict:
    """The trainer's own epoch on the counting stand-ins (``count_epoch``), once per config and world size
    for ``model`` (a ``costs.Model``: its ``counted`` holds them, so a plan counts the code it runs with):
    every call's batch, every encode's phase (~0.06 s a count). The ZeRO stage and checkpointing change
    no call, and whole-model sampling is counted both ways (its gathers are recorded, ``zero_traffic``
    prices them or not): one count serves them all."""
    from fastcps.plan.costs import cfg_mult, with_changes

    canonical = with_changes(
        cfg,
        {
            "zero_stage": None,
            "whole_model_sampling": True,
            "policy.gradient_checkpointing": False,
        },
    )
    key = (canonical.model_dump_json(), world)
    if key not in model.counted:
        model.counted[key] = count_epoch(
            canonical,
            world,
            latent_shape=(1, 1),
            sigmas=model.sigmas,
            cfg_mult=cfg_mult(cfg),
            evaluate=model.evaluate,
        )
    return model.counted[key]


def call_batches(counted: dict) -> dict:
    """Samples per transformer call (the largest of each phase) and images per VAE decode call, as the
    trainer's own functions made them (a policy decodes ``costs.DECODE_CHUNK`` images at a time)."""
    from fastcps.plan.costs import DECODE_CHUNK

    def largest(phase: str) -> int:
        return max((b for (ph, _, b) in counted["calls"] if ph == phase), default=0)

    decode = max(counted["vae"], default=0)
    decode_eval = max(counted.get("vae_eval", {}), default=0)
    return {
        "train": largest("training forward"),
        "rollout": largest("rollout"),
        "eval": largest("eval"),
        "decode": min(DECODE_CHUNK, decode),
        "decode_eval": min(DECODE_CHUNK, decode_eval),
        # an encode inside a whole-model gather holds the text encoders beside the gathered weights
        "encode_in_whole": any(whole for (_, whole), n in counted.get("encodes", {}).items() if n),
    }


def _evaluate(evaluate, cfg: RunConfig, world: int, policy, engine, encodings) -> None:
    """The trainer's eval (``evaluate``) on the stand-ins, for rank 0 of ``world``."""
    from fastcps.rollout import eval_prompt_set

    evaluate(
        1,
        cfg=cfg,
        world=world,
        rank=0,
        device=torch.device("cpu"),
        policy=policy,
        engine=engine,
        encodings=encodings,
        eval_prompts=list(zip(*eval_prompt_set(cfg))),
        reward_fn=ConstantReward(),
        ema=None,
        logger=SimpleNamespace(images=lambda *a, **k: None),
    )


def phase_flops(counted: dict, meter, vae_flop, checkpointing: bool) -> dict:
    """FLOPs per phase on one rank: each counted call at its measured cost (``meter.flops(kind, b)``:
    forward, autograd backward; with ``checkpointing`` the checkpointed step's backward, whose extra
    over the plain one is the re-forward). ``vae_flop(b)``: one decode of b latents."""
    out = dict.fromkeys(PHASES, 0.0)
    for (phase, _, samples), n in counted["calls"].items():
        if phase == "training backward":
            plain = meter.flops("train", samples)[1]
            out[phase] += n * plain
            if checkpointing:
                out["checkpoint re-forward"] += n * (meter.flops("ckpt", samples)[1] - plain)
        else:
            out[phase] += n * meter.flops("nograd", samples)[0]
    for b, n in counted["vae"].items():
        out["VAE decode"] += n * vae_flop(b)
    for b, n in counted.get("vae_eval", {}).items():  # eval's decodes are eval's
        out["eval"] += n * vae_flop(b)
    return out


def anchor_flop_per_image(anchor, meter, vae_flop) -> dict:
    """The anchor recipe's FLOPs per image by phase (``plan_facts.Anchor``), from the same transformer
    measured at its text length (and the same VAE decode: it decodes every image too). A call runs
    ``anchor.batch`` images, ``anchor.cfg`` samples each; with ``checkpointing`` the backward includes the
    checkpointed blocks' re-forward; ``reference_forwards`` add the KL reference's no-grad forwards."""
    b, c = anchor.batch * anchor.cfg, anchor.cfg
    fwd = meter.step("nograd", b).forward_flop / b * c
    train = meter.step("ckpt" if anchor.checkpointing else "train", b)
    out = {
        "rollout": anchor.rollout_forwards * fwd,
        "VAE decode": vae_flop(1),
        "training forward": anchor.trained_steps * train.forward_flop / b * c,
        "training backward": anchor.trained_steps * train.backward_flop / b * c,
    }
    if anchor.reference_forwards:  # the KL term's frozen reference, no grad, at every trained step
        out["KL reference forward"] = anchor.reference_forwards * anchor.trained_steps * fwd
    out["total"] = sum(out.values())
    return out
