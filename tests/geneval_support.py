"""Shared by the geneval tests: a stand-in for the Mask2Former model that hands out crafted outputs."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class CraftedMask2Former(torch.nn.Module):
    """Stands in for the model: hands out the given outputs one image at a time, records its inputs."""

    def __init__(self, outputs):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.outputs, self.seen = list(outputs), []

    def forward(self, pixel_values):
        self.seen.append(pixel_values)
        cls, masks = zip(*[self.outputs.pop(0) for _ in range(pixel_values.shape[0])])
        return SimpleNamespace(class_queries_logits=torch.stack(cls), masks_queries_logits=torch.stack(masks))


def crafted(cells: list[tuple[int, tuple[int, int, int, int]]], q=4, h=16, w=24):
    """Query k predicts class ``cells[k][0]`` (p = 0.974) with mask logit +8 on the low-res cells
    ``cells[k][1]`` = (r0, c0, r1, c1), -8 elsewhere; other queries predict no object."""
    cls = torch.full((q, 81), -4.0)
    cls[:, 80] = 4.0
    masks = torch.full((q, h, w), -8.0)
    for k, (label, (r0, c0, r1, c1)) in enumerate(cells):
        cls[k, 80], cls[k, label] = -4.0, 4.0
        masks[k, r0:r1, c0:c1] = 8.0
    return cls, masks
