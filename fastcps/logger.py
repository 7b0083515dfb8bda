"""Run feedback on rank 0: TensorBoard scalars and image grids, a metrics.jsonl, the reward curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if wandb:
            try:
                import wandb as wb
            except ImportError as err:
                raise RuntimeError("log.wandb is true but wandb is not installed: pip install 'fastcps[wandb]'") from err
            self.wandb = wb.init(project="fastcps", name=self.run_dir.name, config=config, dir=str(self.run_dir))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"epoch": step, **clean}) + "\n")
        self._jsonl.flush()
        if self.tb:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(clean, step=step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A grid of [B,3,H,W] images in [0,1], as a PNG in <run>/images and in TensorBoard."""
        if not self.enabled or images.numel() == 0:
            return
        from torchvision.utils import make_grid, save_image

        nrow = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
        small = images.shape[-1] < 64  # upscale toy images so the grid is readable
        imgs = torch.nn.functional.interpolate(images.float(), scale_factor=4, mode="nearest") if small else images
        grid = make_grid(imgs.float().clamp(0, 1), nrow=nrow, padding=2, pad_value=0.5)
        save_image(grid, self.run_dir / "images" / f"{tag.replace('/', '_')}_epoch{step:04d}.png")
        if self.tb:
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_reward_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    """reward/mean (training rollouts) and every eval/* against the epoch, as <run>/reward_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r if k == "reward/mean" or k.startswith("eval/")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in keys:
        pts = [(r["epoch"], r[k]) for r in rows if k in r]
        ax = axes[1] if k == "eval/diversity" else axes[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if k.startswith("eval/") else None,
                label=k, ms=3)
    axes[0].set_title("reward")
    axes[1].set_title("eval/diversity (mode-collapse guard)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out or Path(run_dir) / "reward_curve.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
