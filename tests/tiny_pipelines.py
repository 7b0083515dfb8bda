"""The tiny random pipelines live in the package (fastcps.tiny): the GPU check builds them too."""

from fastcps.tiny import CLIP_DIM, T5_DIM, save_tiny_flux, save_tiny_sd3  # noqa: F401
