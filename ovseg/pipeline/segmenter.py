"""The segmenter: composes predictor, feature extractor and refiner for one image.

Follows DESIGN.md section 1: resize to the protocol's short side, sliding windows, one batched
forward per stage, refine to full resolution, reduce synonyms, resize to the original size, argmax,
optional SCLIP-style probability and area thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.errors import ConfigError
from .protocol import Protocol
from .stages import FeatureExtractor, Refiner, VLMPredictor, module_device, module_dtype
from .vocabulary import Vocabulary
from .windows import crop_windows, sliding_windows

__all__ = ["Segmenter", "Segmentation", "apply_thresholds", "to_float_image"]


@dataclass
class Segmentation:
    """Result for one image: `labels` (H, W) int64 and class `scores` (C, H, W) float32.

    `scores` are softmax probabilities when the protocol has a `logit_scale`, else refined raw scores.
    """

    labels: torch.Tensor
    scores: torch.Tensor
    vocabulary: Vocabulary


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 or float image to float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    return image.float()


def apply_thresholds(probs: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Argmax with SCLIP's `area_thd` and `prob_thd` (both optional) on (C, H, W) probabilities."""
    bg = protocol.background_index
    if protocol.area_thd is not None:
        num_classes = probs.shape[0]
        area = torch.bincount(probs.argmax(0).flatten(), minlength=num_classes).to(probs.dtype)
        fg = torch.ones(num_classes, dtype=torch.bool, device=probs.device)
        fg[bg] = False
        keep = area > protocol.area_thd * area[fg].sum()
        keep[bg] = True
        probs = probs * keep.to(probs.dtype).view(-1, 1, 1)
    best, labels = probs.max(0)
    if protocol.prob_thd is not None:
        labels = torch.where(best < protocol.prob_thd, torch.full_like(labels, bg), labels)
    return labels


class Segmenter(nn.Module):
    """Composes the three stages; `segment(image)` gives labels and scores at the image's size."""

    def __init__(
        self,
        predictor: VLMPredictor,
        refiner: Refiner,
        extractor: FeatureExtractor | None = None,
        protocol: Protocol | None = None,
    ):
        super().__init__()
        if refiner.needs_features and extractor is None:
            raise ConfigError(
                f"refiner {type(refiner).__name__} needs a feature extractor; set `extractor:` in the method "
                "config or pass --extractor (e.g. dino)"
            )
        self.predictor = predictor
        self.refiner = refiner
        self.extractor = extractor if refiner.needs_features else None
        self.protocol = protocol or Protocol()
        self.vocabulary: Vocabulary | None = None

    @property
    def random_weights(self) -> bool:
        return any(getattr(m, "random_weights", False) for m in (self.predictor, self.extractor) if m is not None)

    def set_classes(self, classes: Vocabulary | Sequence) -> Vocabulary:
        vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary(classes)
        if vocabulary is not self.vocabulary:
            self.predictor.set_classes(vocabulary)
            self.vocabulary = vocabulary
        return vocabulary

    def _batched(self, stage: nn.Module, crops: torch.Tensor) -> torch.Tensor:
        size = self.protocol.window_batch or crops.shape[0]
        dtype = module_dtype(stage)
        return torch.cat([stage(crops[i : i + size].to(dtype)) for i in range(0, crops.shape[0], size)])

    @torch.no_grad()
    def refined_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Per-name scores (Q, h, w) on the resized image (before synonym reduction)."""
        h, w = self.protocol.resized_size(*image.shape[-2:])
        if (h, w) != tuple(image.shape[-2:]):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        crop = self.protocol.crop or (h, w)
        boxes = sliding_windows(h, w, crop, self.protocol.stride)
        crops = crop_windows(image, boxes)
        scores = self._batched(self.predictor, crops).float()
        features = self._batched(self.extractor, crops).float() if self.extractor is not None else None
        return self.refiner(image, boxes.to(image.device), scores, features).float()

    @torch.no_grad()
    def segment(self, image: torch.Tensor, classes: Vocabulary | Sequence | None = None) -> Segmentation:
        """Segment one (3, H, W) image (uint8, or float in [0, 1]) with `classes` or the cached vocabulary."""
        if classes is not None:
            self.set_classes(classes)
        if self.vocabulary is None:
            raise ConfigError("no classes set: call set_classes(...) or pass classes=")
        device = module_device(self)
        image = to_float_image(image.to(device))
        size = tuple(image.shape[-2:])
        scores = self.refined_scores(image)
        p = self.protocol
        if p.logit_scale is None:
            # LPOSS order: reduce synonyms, then resize, then argmax on raw scores
            scores = self.vocabulary.reduce(scores)
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        else:
            # SCLIP order: resize, softmax over all names, then max over each class's names
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
            scores = self.vocabulary.reduce(torch.softmax(scores * p.logit_scale, dim=0))
        return Segmentation(apply_thresholds(scores, p), scores, self.vocabulary)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segment(image).labels
