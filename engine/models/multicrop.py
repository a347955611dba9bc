"""Backbone + head over a list of crops of several resolutions, as DINO runs them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive crops of one resolution concatenated: one backbone batch each."""
    groups, current = [], [crops[0]]
    for crop in crops[1:]:
        if crop.shape[-2:] == current[-1].shape[-2:]:
            current.append(crop)
        else:
            groups.append(current)
            current = [crop]
    groups.append(current)
    return [torch.cat(g) if len(g) > 1 else g[0] for g in groups]


class MultiCropWrapper(nn.Module):
    """`forward(crops)` -> head outputs of all crops, crop-major (the official order).

    packed=False: one backbone pass per resolution group (the official code).
    packed=True: all crops in one token sequence, attention kept within each image (DINOv2):
    one launch per layer covers global and local crops. Both give the same outputs.
    The head runs once over the concatenated CLS features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        groups = resolution_groups(crops)
        if self.packed and len(groups) > 1:
            features = self.backbone.forward_packed(groups)
        else:
            features = torch.cat([self.backbone(g) for g in groups])
        return self.head(features)
