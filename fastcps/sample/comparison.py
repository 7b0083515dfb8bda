"""Base vs trained from the same noise (``python -m fastcps.sample``): the checkpoint's weights checked
against the model and loaded into it, both models' images sampled as the trainer's eval samples them, and
their rewards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastcps.sample.inputs import UsageError


def check_trained(model: torch.nn.Module, weights) -> None:
    """The export holds every trained parameter of the model and nothing the model lacks (names and
    shapes; a full fine-tuning export holds the whole state dict): checked before any image is made."""
    path = weights.path
    state = dict(model.state_dict(keep_vars=True))
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    have = set(weights.keys())
    extra, missing = sorted(have - set(state)), sorted(want - have)
    if extra or missing:
        raise UsageError(
            f"--checkpoint: {path} does not match this run's trained parameters ({len(extra)} unexpected, "
            f"e.g. {extra[:2]}; {len(missing)} missing, e.g. {missing[:2]}): was it written with this "
            "config.json (policy.lora)?"
        )
    for name in sorted(have):
        if weights.shape(name) != tuple(state[name].shape):
            raise UsageError(
                f"--checkpoint: {path}: {name} has shape {weights.shape(name)}, the model's "
                f"{tuple(state[name].shape)}"
            )


@torch.no_grad()
def load_trained(model: torch.nn.Module, weights) -> None:
    """Copy the export into the model's tensors of the same names, one tensor at a time (a full FLUX
    export does not fit twice in host memory)."""
    state = dict(model.state_dict(keep_vars=True))
    for name in weights.keys():
        state[name].copy_(weights.get(name))


@dataclass
class Comparison:
    prompts: list[str]
    images: dict[str, torch.Tensor]  # "base" / "trained" -> (P, K, 3, H, W) in [0, 1], CPU
    total: dict[str, torch.Tensor]  # -> (P, K) weighted reward
    components: dict[str, dict[str, torch.Tensor]]  # -> reward name -> (P, K)
    #: an editing policy's source images, one (S, 3, H, W) tensor per prompt in [0, 1] as the policy read
    #: them (loaded and resized as the anchor does: ``fastcps.edit_images.load_image``); None otherwise
    sources: list[torch.Tensor] | None = None


def source_images(policy, meta: list[dict]) -> list[torch.Tensor] | None:
    """Each edit prompt's source images at the policy's resolution, what its encoder was given; None for a
    text-to-image policy."""
    if not getattr(policy, "editing", False):
        return None
    from fastcps.edit_images import SOURCE_IMAGES, load_image

    return [torch.stack([load_image(ref, policy.resolution) for ref in m[SOURCE_IMAGES]]) for m in meta]


@torch.no_grad()
def generate(
    policy, model, encodings, prompts: list[str], sampling, *, k: int, seed: int, device, meta=None
) -> torch.Tensor:
    """(P, K, 3, H, W): every prompt's K images with ``sampling``; noise seeded by (seed, prompt, image).
    ``meta``: each prompt's metadata (an edit prompt's source images)."""
    from fastcps.rollout import eval_noise, sample
    from fastcps.runtime import derive_seed

    step_seeds = [derive_seed(seed, 6, i) for i in range(len(sampling.coeffs))]
    out = []
    meta = [{}] * len(prompts) if meta is None else meta
    for p, (prompt, m) in enumerate(zip(prompts, meta)):
        cond, _ = encodings.for_prompts([prompt], device, [m])
        x1 = eval_noise(policy, seed, p, k, device)
        final = sample(policy, model, cond, x1, sampling, step_seeds=step_seeds, first_index=p * k).final
        out.append(policy.decode(final).float().cpu())
    return torch.stack(out)


def compare(
    policy,
    checkpoint: Path,
    prompts: list[str],
    meta: list[dict],
    reward_fn,
    sampling,
    *,
    k: int,
    seed: int,
    device,
) -> Comparison:
    """Base images, then trained images (``checkpoint``'s exported weights) from the same noise, and
    their rewards. LoRA: one model with its adapters off, then on. Full fine-tuning: the trained weights
    overwrite the base in place."""
    from fastcps.checkpoint import ExportedWeights
    from fastcps.rollout import PromptEncodings

    weights = ExportedWeights(checkpoint)

    device = torch.device(device)
    sampling = sampling._replace(trained=[]).to(device)  # nothing to keep for an update
    encodings = PromptEncodings(policy)
    model = policy.transformer.eval()
    check_trained(model, weights)
    run = lambda m: generate(  # noqa: E731
        policy, m, encodings, prompts, sampling, k=k, seed=seed, device=device, meta=meta
    )
    if policy.lora:
        load_trained(model, weights)
        with policy.reference(model) as base_model:
            base = run(base_model)
    else:
        base = run(model)
        load_trained(model, weights)
    images = {"base": base, "trained": run(model)}
    total, comps = {}, {}
    for which, imgs in images.items():
        rows = [reward_fn(imgs[p], [prompts[p]] * k, [meta[p]] * k) for p in range(len(prompts))]
        total[which] = torch.stack([r.total for r in rows])
        comps[which] = {n: torch.stack([r.components[n] for r in rows]) for n in rows[0].components}
    return Comparison(prompts, images, total, comps, source_images(policy, meta))


def means(c: Comparison) -> dict[str, dict[str, float]]:
    return {
        w: {"total": float(c.total[w].mean()), **{n: float(v.mean()) for n, v in c.components[w].items()}}
        for w in c.images
    }
