"""Run feedback on rank 0: TensorBoard scalars and image grids, a metrics.jsonl, the reward curve,
progress lines, and the summary a finished run prints.

Library code logs through ``logging.getLogger(__name__)`` (under the ``fastcps`` logger); a command
line tool calls ``setup_logging()`` once, which prints ``[fastcps] ...`` lines on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch


class RankZeroFilter(logging.Filter):
    """Passes records on rank 0 (``RANK`` of the launcher, else the process group's rank) and records
    logged with ``extra={"all_ranks": True}`` on every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "all_ranks", False)) or _rank() == 0


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[fastcps] {level}{record.getMessage()}"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted (pytest's capture replaces it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property decides
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """``[fastcps] message`` lines on stdout (``[fastcps] warning: ...`` from WARNING up), rank 0 only.
    Idempotent: a second call (an in-process re-run) adds no second handler."""
    root = logging.getLogger("fastcps")
    root.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_Format())
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
    return root


class PhaseLine:
    """A progress bar's twin for logs people read later (a file, a scheduler's log): nothing while the
    phase runs, then one line with its count, time and rate, e.g.
    ``[fastcps] epoch 3 rollout: 64 images in 1.2 s (53.3 images/s)``. No carriage returns."""

    def __init__(self, iterable=None, *, total=None, desc: str, unit: str, unit_scale: int = 1, file=None):
        self.iterable, self.desc, self.unit, self.scale = iterable, desc, unit, unit_scale
        self.file = file or sys.stderr
        self.n = 0
        self.t0 = time.perf_counter()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        dt = time.perf_counter() - self.t0
        count = self.n * self.scale
        print(
            f"[fastcps] {self.desc}: {count} {self.unit} in {dt:.1f} s ({count / max(dt, 1e-9):.1f} "
            f"{self.unit}/s)",
            file=self.file,
            flush=True,
        )


class _Silent:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    iterable=None, *, total=None, desc: str, unit: str, unit_scale: int = 1, enabled: bool = True, file=None
):
    """A tqdm bar when ``file`` (stderr) is a terminal, else one ``PhaseLine`` when the phase ends;
    nothing when not ``enabled``. Use as an iterable wrapper or with ``update(n)`` / ``close()``.
    ``unit_scale`` counts each step as that many units (a rollout batch = its images)."""
    if not enabled:
        return _Silent(iterable)
    file = file or sys.stderr
    if file.isatty():
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit_scale if unit_scale != 1 else False,
            leave=False,
            file=file,
        )
    return PhaseLine(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=file)


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool = True,
        wandb: bool = False,
        config: dict | None = None,
    ):
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
                raise RuntimeError(
                    "log.wandb is true but wandb is not installed: pip install 'fastcps[wandb]'"
                ) from err
            self.wandb = wb.init(
                project="fastcps", name=self.run_dir.name, config=config, dir=str(self.run_dir)
            )
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
        imgs = (
            torch.nn.functional.interpolate(images.float(), scale_factor=4, mode="nearest")
            if small
            else images
        )
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


def metrics_line(m: dict[str, float]) -> str:
    """The console line of an epoch's (or the base model's) metrics: eval, reward, ratio, time."""
    keys = [k for k in m if k.startswith("eval/") or k in ("reward/mean", "train/ratio_dev", "time/epoch_s")]
    return "  ".join(f"{k}={m[k]:.4g}" for k in keys)


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
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o" if k.startswith("eval/") else None,
            label=k,
            ms=3,
        )
    axes[0].set_title("reward")
    axes[1].set_title("eval/diversity (mode-collapse guard)")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:  # eval.every = 0: the diversity panel stays empty
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out or Path(run_dir) / "reward_curve.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
