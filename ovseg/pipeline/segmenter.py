"""The segmenter: composes predictor, feature extractor and refiner for one image.

One image, in order:

1. resize to the protocol's size as mmcv does (uint8, OpenCV; `ovseg.pipeline.imaging`), unless the
   data path already did (a `ResizedImage`);
2. `predictor.set_image(image)`, then sliding windows, one batched forward per stage;
3. `refiner.refine_windows`, the merge of the windows (each window's map resized bilinearly to its box,
   summed, divided by the count: the segmenter does this once for every refiner), `refiner.refine_canvas`;
4. to the original size and a label map, in one of two orders:
   - no `logit_scale` (LPOSS): reduce synonyms (max), resize, `refiner.refine_output`, argmax;
   - `logit_scale` (SCLIP family): resize, `refiner.refine_output`, softmax over all names, max over
     each class's names, SCLIP's `area_thd` and `prob_thd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.errors import ConfigError
from ovseg.runtime import module_device

from .imaging import ResizedImage, resize_uint8, to_uint8
from .protocol import Protocol
from .stages import FeatureExtractor, Refiner, Stage, VLMPredictor
from .vocabulary import Vocabulary
from .windows import crop_windows, merge_windows, sliding_windows

__all__ = ["Segmenter", "Segmentation", "ResizedImage", "apply_thresholds", "resize_for"]


@dataclass
class Segmentation:
    """Result for one image: `labels` (H, W) int64 and class `scores` (C, H, W) float32.

    `scores` are softmax probabilities when the protocol has a `logit_scale`, else refined raw scores.
    """

    labels: torch.Tensor
    scores: torch.Tensor
    vocabulary: Vocabulary


def resize_for(image: torch.Tensor, protocol: Protocol) -> ResizedImage:
    """A (3, H, W) uint8 or [0, 1] float image resized for `protocol` (what the data path does in workers)."""
    image = to_uint8(image)
    size = tuple(image.shape[-2:])
    return ResizedImage(resize_uint8(image, protocol.resized_size(*size)), size)


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
        """Whether any stage, or a model a stage owns (a predictor's vision model), has random weights."""
        return any(m.random_weights for m in self.modules() if isinstance(m, Stage))

    def set_classes(self, classes: Vocabulary | Sequence) -> Vocabulary:
        vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary(classes)
        if vocabulary is not self.vocabulary:
            self.predictor.set_classes(vocabulary)
            self.vocabulary = vocabulary
        return vocabulary

    def _batched(self, stage: nn.Module, crops: torch.Tensor) -> torch.Tensor:
        size = self.protocol.window_batch or crops.shape[0]
        return torch.cat([stage(crops[i : i + size]) for i in range(0, crops.shape[0], size)]).float()

    @torch.no_grad()
    def refined_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Per-name scores (Q, H, W) on an already resized float image (3, H, W) in [0, 1]."""
        h, w = image.shape[-2:]
        boxes = sliding_windows(h, w, self.protocol.crop or (h, w), self.protocol.stride)
        crops = crop_windows(image, boxes)
        self.predictor.set_image(image)
        scores = self._batched(self.predictor, crops)
        features = self._batched(self.extractor, crops) if self.extractor is not None else None
        boxes = boxes.to(image.device)
        windows = self.refiner.refine_windows(image, boxes, scores, features)
        merged = merge_windows(windows.float(), boxes, h, w)
        return self.refiner.refine_canvas(image, merged).float()

    @torch.no_grad()
    def segment(
        self, image: torch.Tensor | ResizedImage, classes: Vocabulary | Sequence | None = None
    ) -> Segmentation:
        """Segment one image: (3, H, W) uint8 or float in [0, 1] at its original size, or a `ResizedImage`
        from the data path. `classes` replaces the cached vocabulary."""
        if classes is not None:
            self.set_classes(classes)
        if self.vocabulary is None:
            raise ConfigError("no classes set: call set_classes(...) or pass classes=")
        if not isinstance(image, ResizedImage):
            image = resize_for(image, self.protocol)
        expected = self.protocol.resized_size(*image.original_size)
        if tuple(image.pixels.shape[-2:]) != expected:
            raise ValueError(
                f"a {tuple(image.pixels.shape[-2:])} image was resized for another protocol "
                f"(this one expects {expected} for an original size of {image.original_size})"
            )
        resized = image.pixels.to(module_device(self)).float() / 255.0
        scores = self.refined_scores(resized)
        p = self.protocol
        if p.logit_scale is None:
            # LPOSS order: reduce synonyms, then resize, then argmax on raw scores
            scores = self.vocabulary.reduce(scores)
            scores = self._to_original(scores, image.original_size)
            scores = self.refiner.refine_output(resized, scores)
        else:
            # SCLIP order: resize, softmax over all names, then max over each class's names
            scores = self._to_original(scores, image.original_size)
            scores = self.refiner.refine_output(resized, scores)
            scores = self.vocabulary.reduce(torch.softmax(scores * p.logit_scale, dim=0))
        return Segmentation(apply_thresholds(scores, p), scores, self.vocabulary)

    @staticmethod
    def _to_original(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(scores.shape[-2:]) == tuple(size):
            return scores
        return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.segment(image).labels
