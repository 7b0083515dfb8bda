"""Train the CNN behind the ``digit`` reward: ``python -m fastcps.toy.train_classifier [--seed 0]``.

Trains ``fastcps.rewards.digit.DigitCNN`` on the toy's train split with light augmentation (±1 px
shifts, ±12° rotations, 0.9–1.1 scale, blur, contrast and Gaussian pixel noise) so that it scores
imperfect generated images sensibly, then prints the held-out accuracy and ships it in the weights'
metadata (``heldout_accuracy``). Deterministic given ``--seed`` (fixed data order from a seeded
generator, deterministic algorithms, CPU). About 50 s on 2 CPU cores.

``--clean`` trains the same architecture for the ``digit_clean_trained`` reward
(``fastcps/assets/toy_digits_classifier_clean.safetensors``): geometric augmentation only (the same
shifts, rotations and scales), no pixel noise, no blur, no contrast change. Like a preference model
trained on clean images (PickScore, HPSv2), it has never seen noisy images and scores them down.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcps.rewards.digit import CLEAN_CLASSIFIER, DEFAULT_CLASSIFIER, DigitCNN
from fastcps.toy.digits import load_split

__all__ = ["augment", "augment_geometric", "heldout_accuracy", "main", "train_classifier"]


def augment_geometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The geometric part of ``augment`` (±12° rotation, 0.9–1.1 scale, ±1 px shift), its first
    random draws: the ``--clean`` classifier's whole augmentation."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)
    ang = (u(b) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * u(b)
    shift = (u(b, 2) * 2 - 1) * (2.0 / 16)  # up to ±1 px in normalised coordinates
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random light distortions of [B, 1, 16, 16] images in [-1, 1] (background −1)."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)
    y = augment_geometric(x, g)
    # blur a third of the batch (3×3 binomial kernel): generated digits are often soft
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16.0).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k)
    y = torch.where((u(b) < 0.33).view(b, 1, 1, 1), blurred, y)
    # contrast: foreground intensity × 0.7..1.1
    y = (y + 1.0) * (0.7 + 0.4 * u(b)).view(b, 1, 1, 1) - 1.0
    # pixel noise with std 0..0.3 on half the batch
    std = 0.3 * u(b) * (u(b) < 0.5).float()
    y = y + std.view(b, 1, 1, 1) * torch.randn(y.shape, generator=g)
    return y.clamp(-1.0, 1.0)


@torch.no_grad()
def heldout_accuracy(model: DigitCNN) -> float:
    x, y = load_split("heldout")
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def train_classifier(
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    log: bool = True,
    clean: bool = False,
    label_smoothing: float = 0.05,
) -> DigitCNN:
    """``clean``: geometric augmentation only (``augment_geometric``), else ``augment``."""
    aug = augment_geometric if clean else augment
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(seed)
    x, y = load_split("train")
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        tot = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(aug(x[idx], g)), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if log and (epoch % 10 == 9 or epoch == epochs - 1):
            print(
                f"epoch {epoch + 1}/{epochs}  loss {tot / len(y):.4f}  heldout_acc "
                f"{heldout_accuracy(model):.4f}"
            )
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default: the shipped asset of the chosen reward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument(
        "--clean",
        action="store_true",
        help="train the digit_clean_trained reward's classifier: geometric augmentation only",
    )
    args = ap.parse_args(argv)
    args.out = args.out or str(CLEAN_CLASSIFIER if args.clean else DEFAULT_CLASSIFIER)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    model = train_classifier(seed=args.seed, epochs=args.epochs, clean=args.clean)
    acc = heldout_accuracy(model)
    print(f"heldout_accuracy {acc:.4f} ({time.time() - t0:.1f}s)")
    if acc < 0.95:
        raise SystemExit(f"held-out accuracy {acc:.4f} < 0.95: not saving {args.out}")
    from safetensors.torch import save_file

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    clean = " --clean" if args.clean else ""
    meta = {
        "format": "fastcps-toy-digit-classifier-v1",
        "config": json.dumps({"width": 32}),
        "heldout_accuracy": f"{acc:.4f}",
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "augmentation": (
            "geometric only: ±12° rotation, 0.9-1.1 scale, ±1 px shift; no pixel noise, no blur, "
            "no contrast change"
            if args.clean
            else "geometric (±12° rotation, 0.9-1.1 scale, ±1 px shift), blur on 1/3, contrast 0.7-1.1, "
            "Gaussian pixel noise std 0-0.3 on 1/2"
        ),
        "training": (
            f"AdamW lr 2e-3 wd 1e-4, OneCycle, batch 64, label smoothing 0.05, {args.epochs} epochs on the "
            "toy's train split (sklearn digits minus 360 held out), CPU, deterministic algorithms"
        ),
        "command": f"python -m fastcps.toy.train_classifier{clean} --seed {args.seed} --epochs {args.epochs}",
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out, metadata=meta)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
