"""The three stage interfaces that ovseg composes, and the input convention they share.

Every stage takes images as float (B, 3, H, W) in [0, 1], RGB, not normalised: each model applies its
own mean/std and zero-pads bottom/right to a multiple of its patch size (`prepare_images`). This keeps
the segmenter free of model-specific preprocessing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vocabulary import Vocabulary

__all__ = ["VLMPredictor", "FeatureExtractor", "Refiner", "prepare_images", "grid_size", "module_device", "module_dtype", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def grid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid of an image after zero-padding to a multiple of `patch_size`."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def prepare_images(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Normalise (B, 3, H, W) images in [0, 1] and zero-pad bottom/right to a multiple of the patch.

    Padding happens after normalisation (zeros in normalised space), as the LPOSS reference does.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images - m) / s
    h, w = x.shape[-2:]
    gh, gw = grid_size(h, w, patch_size)
    x = F.pad(x, (0, gw * patch_size - w, 0, gh * patch_size - h))
    return x.to(dtype) if dtype is not None else x


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module with neither)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's parameters (float32 for a module without parameters)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class VLMPredictor(nn.Module, ABC):
    """Per-patch class scores from images and class names.

    `set_classes` caches one text embedding per name; `forward(images)` returns raw cosine
    similarities (B, Q, ceil(H/p), ceil(W/p)) with Q = `len(vocabulary.names)`. No softmax.
    """

    patch_size: int

    @abstractmethod
    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Encode and cache the text embeddings of every name of `vocabulary`."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw cosine scores (B, Q, h, w) for float images (B, 3, H, W) in [0, 1]."""


class FeatureExtractor(nn.Module, ABC):
    """Per-patch L2-normalised features (B, D, h, w) for affinities."""

    patch_size: int

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features (B, D, ceil(H/p), ceil(W/p))."""


class Refiner(nn.Module, ABC):
    """Turns window-level patch scores into full-resolution class scores.

    `forward(image, boxes, scores, features)`: `image` (3, H, W) in [0, 1] (the resized image),
    `boxes` (W, 4) int `[y1, y2, x1, x2]`, `scores` (W, Q, h, w), `features` (W, D, h', w') or
    None. Returns (Q, H, W).
    """

    #: whether the segmenter must run a feature extractor for this refiner
    needs_features: bool = False

    @abstractmethod
    def forward(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        features: torch.Tensor | None,
    ) -> torch.Tensor:
        """Full-resolution scores (Q, H, W)."""
