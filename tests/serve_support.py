"""A test reward for the reward service (``python -m fastcps.rewards.serve --reward
serve_support:IdentityReward``, tests/ on PYTHONPATH): each image carries its id in its first pixel
levels, and its score is that id when the prompt and metadata that came with it name the same id, so a
score that reached the wrong request, or an image separated from its prompt, shows."""

import time

import torch

from fastcps.rewards._util import to_uint8


def identity_images(ids: list[int], size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images [len(ids), 3, size, size] of 8-bit levels (k/255), noise but for the id in pixel (0, 0) of
    channels 0 and 1 (id % 256, id // 256)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (len(ids), 3, size, size), generator=g)
    for i, k in enumerate(ids):
        levels[i, 0, 0, 0], levels[i, 1, 0, 0] = k % 256, k // 256
    return levels.float() / 255


def prompts_of(ids: list[int]) -> tuple[list[str], list[dict]]:
    return [f"image {k}" for k in ids], [{"id": k} for k in ids]


class IdentityReward:
    """Score = the id in the image where its prompt and metadata say the same, else -1; raises when a
    prompt is "raise". ``delay_s``: a sleep per call, as a model's compute, so that requests queue up;
    ``load_s``: a sleep in ``load``, as a large model's loading."""

    name = "identity"

    def __init__(self, delay_s: float = 0.0, load_s: float = 0.0):
        self.delay_s, self.load_s = float(delay_s), float(load_s)

    def load(self, device) -> None:
        time.sleep(self.load_s)

    def __call__(self, images, prompts, metadata):
        if "raise" in prompts:
            raise ValueError("a prompt asked this reward to raise")
        time.sleep(self.delay_s)
        levels = to_uint8(images).long()
        ids = (levels[:, 0, 0, 0] + 256 * levels[:, 1, 0, 0]).tolist()
        return torch.tensor(
            [k if p == f"image {k}" and m.get("id") == k else -1 for k, p, m in zip(ids, prompts, metadata)],
            dtype=torch.float32,
        )
