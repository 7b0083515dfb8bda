"""The GPU check: one command that measures a CUDA machine (``python -m fastcps.gpucheck``).

- ``check``: the command, its parts (gpu tests, kernel benchmarks, the toy run, a FLUX-size epoch) each
  in a process of its own, and the CSV of figures;
- ``runs``: the toy and FLUX-size runs it times, beside the plan's projection.
"""

from fastcps.gpucheck.check import main

__all__ = ["main"]
