"""Template ranking: what a predictor that scores its prompt templates on unlabeled images provides.

FLOSS (ICCV'25) ranks each prompt template of a CLIP text classifier, per class, by the mean entropy
of its predictions on a dataset's images, without labels. A `TemplateRanker` returns per-image
statistics that simply add up (`TemplateStatistics`), so any loop over images (the Python API, or the
Lightning engine on N processes, which sums them across processes) gives the same totals; the
predictor then turns the totals into its rankings document.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .imaging import ResizedImage
from .protocol import Protocol
from .vocabulary import Vocabulary

__all__ = ["TemplateStatistics", "TemplateRanker"]


@dataclass
class TemplateStatistics:
    """Additive per-template, per-class statistics; row `i` is template id `first + i`."""

    entropy_sum: torch.Tensor  # (T, C) float64: summed entropy of the pixels where template t predicts class c
    count: torch.Tensor  # (T, C) float64: how many pixels that is
    pixels: torch.Tensor  # () float64: every pixel seen (the sum of the images' H·W)
    first: int = 0

    def __add__(self, other: "TemplateStatistics") -> "TemplateStatistics":
        if other.first != self.first or other.count.shape != self.count.shape:
            raise ValueError("statistics of different template ranges cannot be added")
        return TemplateStatistics(self.entropy_sum + other.entropy_sum, self.count + other.count,
                                  self.pixels + other.pixels, self.first)


class TemplateRanker(ABC):
    """Mixin for predictors that rank their prompt templates (see the module docstring)."""

    @property
    @abstractmethod
    def num_templates(self) -> int:
        """How many prompt templates the text classifier has (ids 0 .. num_templates - 1)."""

    @abstractmethod
    def template_statistics(
        self, image: torch.Tensor | ResizedImage, protocol: Protocol, first: int = 0, last: int | None = None
    ) -> TemplateStatistics:
        """Statistics of one image ((3, H, W) at its original size, or already resized for `protocol`) for
        templates `first..last` (inclusive; None = the last template), over the current vocabulary."""

    @abstractmethod
    def rankings_document(
        self, statistics: TemplateStatistics, *, dataset: str, split: str, previous: Mapping | None = None
    ) -> dict[str, Any]:
        """The rankings of the current vocabulary from dataset totals, merged into `previous` if given."""

    @abstractmethod
    def has_rankings(self, document: Mapping, dataset: str, vocabulary: Vocabulary) -> bool:
        """Whether `document` already ranks every template for every class of `vocabulary` on `dataset`."""
