"""Look at a trained run: base model vs trained model, from the same noise, scored by the run's rewards.

    python -m fastcps.sample --run runs/digits_cps --out grid.png

Sampling is the trainer's own (``fastcps.rollout``: ``sampling_steps``, ``initial_noise``, ``sample``,
``PromptEncodings``; the policy's ``decode``), so the images are the ones the trainer's eval sees: with
the default prompts, seed and ``--images-per-prompt`` = ``eval.images_per_prompt`` the printed means
are the run's ``eval/<reward>`` at epoch 0 (base) and at the checkpoint (trained, unless EMA is on).

The parts: ``inputs`` (the run, its checkpoint, its prompts; ``UsageError``), ``comparison`` (sampling and
scoring, base and trained), ``outputs`` (the grid and the files beside it), ``cli`` (arguments, ``main``).
"""

from fastcps.sample.cli import main
from fastcps.sample.comparison import Comparison, compare, generate
from fastcps.sample.inputs import UsageError
from fastcps.sample.outputs import draw_grid, write_outputs

__all__ = ["Comparison", "UsageError", "compare", "draw_grid", "generate", "main", "write_outputs"]
