"""The `none` refiner: window scores upsampled and averaged, as plain sliding-window inference."""

from __future__ import annotations

import torch

from .stages import Refiner
from .windows import merge_windows


class NoRefiner(Refiner):
    """Bilinear upsampling of each window to its box, averaged where windows overlap."""

    needs_features = False

    def forward(self, image, boxes, scores, features=None) -> torch.Tensor:
        return merge_windows(scores, boxes, image.shape[-2], image.shape[-1])
