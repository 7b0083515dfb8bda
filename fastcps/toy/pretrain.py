"""Flow-matching pretraining of the toy policy on the digits' train split.

    python -m fastcps.toy.pretrain --out fastcps/assets/toy_digits_base.safetensors --steps N --seed S

Rectified flow as in docs/math.md: ``x_σ = (1 − σ)·x0 + σ·x1``, target ``v = x1 − x0``, σ ~ U(0, 1), MSE.
Each image is conditioned on a prompt for its label, the template drawn at random per sample (so the
paraphrases "the number 7", "a sketch of the digit 7", ... all work). The transformer and the text
encoder train jointly from a seeded random init; both ship in one safetensors file with their
configs in its metadata.

The learning rate is constant after a short warmup, so a run of N steps equals the first N steps of
a longer run: ``--save-every`` checkpoints let one pick N. Base quality moves steeply with N; the
shipped base is deliberately under-trained (``eval/digit`` ≈ 0.5 at 8 ODE steps) so that RL has
room to lift it. Deterministic given ``--seed``: seeded generator for data order, templates, σ and
noise; deterministic algorithms; CPU; one thread by default (``--threads``), since the split of a
reduction across threads can change the last bits. ~0.2–0.4 s per step on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcps.policies.toy import DEFAULT_WEIGHTS, build_transformer, default_transformer_config, save_weights
from fastcps.toy.digits import TEMPLATES, image_ids, load_split, pack, prompt_for
from fastcps.toy.text_encoder import ToyTextEncoder

__all__ = ["main", "pretrain"]


def pretrain(
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 50,
    log_every: int = 0,
    checkpoint=None,
    save_every: int = 0,
):
    """Returns (transformer, text_encoder, transformer_config). ``checkpoint(step, transformer,
    text_encoder)`` is called every ``save_every`` steps when given. Leaves the global RNG and the
    deterministic-algorithms flag as it found them."""
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.use_deterministic_algorithms(True)
            return _pretrain(steps, seed, batch_size, lr, warmup, log_every, checkpoint, save_every)
    finally:
        torch.use_deterministic_algorithms(prev)


def _pretrain(steps, seed, batch_size, lr, warmup, log_every, checkpoint, save_every):
    torch.manual_seed(seed)  # the init of both models
    g = torch.Generator().manual_seed(seed)  # data order, templates, σ, noise

    text_encoder = ToyTextEncoder()
    tcfg = default_transformer_config(text_encoder.hidden_size)
    transformer = build_transformer(tcfg)
    transformer.train()
    text_encoder.train()

    x_all, y_all = load_split("train")
    x_all = pack(x_all)  # [N, 64, 4]
    n_t = len(TEMPLATES)
    prompt_ids = text_encoder.tokenizer([prompt_for(d, t) for d in range(10) for t in range(n_t)])
    img_ids = image_ids()
    txt_ids = torch.zeros(prompt_ids.shape[1], 3)

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    perm, pos = torch.randperm(len(y_all), generator=g), 0
    t0, run = time.time(), 0.0
    for step in range(1, steps + 1):
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(y_all), generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x0, y = x_all[idx], y_all[idx]
        tmpl = torch.randint(0, n_t, (len(idx),), generator=g)
        sigma = torch.rand(len(idx), generator=g)
        x1 = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1)
        xs = (1.0 - s) * x0 + s * x1
        hidden, pooled = text_encoder(prompt_ids[y * n_t + tmpl])
        v = transformer(
            hidden_states=xs,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(v, x1 - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * loss.item() if step > 1 else loss.item()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps}  loss {run:.4f}  ({time.time() - t0:.0f}s)", flush=True)
        if checkpoint is not None and save_every and step % save_every == 0 and step != steps:
            checkpoint(step, transformer, text_encoder)
    return transformer.eval(), text_encoder.eval(), tcfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also write <out stem>.step<N>.safetensors every N steps (to pick --steps)",
    )
    ap.add_argument(
        "--eval-steps", type=int, default=8, help="ODE steps of the eval/digit written to metadata"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 1 keeps results independent of the core count (reduction order)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    def command(steps):
        return (
            f"python -m fastcps.toy.pretrain --out {args.out} --steps {steps} --seed {args.seed} "
            f"--batch-size {args.batch_size} --lr {args.lr}"
        )

    meta = {
        "steps": str(args.steps),
        "seed": str(args.seed),
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "command": command(args.steps),
    }

    def checkpoint(step, transformer, text_encoder):
        # equal to a run with --steps <step>: the learning rate is constant after warmup
        p = out.with_name(f"{out.stem}.step{step}{out.suffix}")
        save_weights(
            p,
            transformer,
            text_encoder,
            tcfg_holder[0],
            {**meta, "steps": str(step), "command": command(step)},
        )
        print(f"  wrote {p}", flush=True)

    tcfg_holder = [default_transformer_config()]
    transformer, text_encoder, tcfg = pretrain(
        args.steps,
        args.seed,
        args.batch_size,
        args.lr,
        log_every=100,
        checkpoint=checkpoint,
        save_every=args.save_every,
    )
    save_weights(out, transformer, text_encoder, tcfg, meta)
    # Score it with the shipped classifier and record the number beside the weights.
    try:
        from fastcps.policies.toy import ToyDigitsPolicy
        from fastcps.toy.evaluate import evaluate_digit

        ev = evaluate_digit(ToyDigitsPolicy(out), num_steps=args.eval_steps)["eval/digit"]
        meta.update(
            {
                "eval_digit": f"{ev:.4f}",
                "eval_protocol": f"ODE {args.eval_steps} steps, 10 digits x 4 "
                "noises, seed 0 (python -m fastcps.toy.evaluate)",
            }
        )
        save_weights(out, transformer, text_encoder, tcfg, meta)
        print(f"eval/digit {ev:.4f} at {args.eval_steps} ODE steps")
    except FileNotFoundError as e:  # no classifier yet
        print(f"skipped eval/digit: {e}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
