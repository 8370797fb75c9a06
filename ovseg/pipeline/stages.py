"""The stage contract (v2): what predictors, feature extractors and refiners declare and do.

Every stage is a `Stage` (an `nn.Module`) that declares, in code:

- `patch_size` (pixels per patch; 1 for refiners) and `random_weights` (True for smoke-test weights);
- `options`: the names `configure(**options)` accepts. `configure` validates the new values
  (`check_options`), applies them, and restores the previous values if any is refused, so a
  per-dataset override never leaves a stage half changed.

Images enter every stage as float (B, 3, H, W) in [0, 1], RGB, not normalised: each stage normalises
with its own statistics and fits the window to its patch grid (`ovseg.pipeline.patches`).

`VLMPredictor`: per-name scores of a batch of windows, on a grid of its choice (the patch grid, a
vision model's finer grid, or pixels); each image of a batch is computed independently. Scores are what
the method feeds its final softmax: raw cosines for most. `set_image(image)` is called once per resized
image before its windows; `text_embeddings` are the (Q, D) unit text embeddings of the vocabulary.
`grid` is its patch-grid policy (`pad`, `floor` or `center`; the default is its authors' code).

`FeatureExtractor`: per-patch features (B, D, h, w), L2-normalised unless built with `normalize=False`.

`Refiner`: turns window scores into canvas scores in up to three steps, each optional:
`refine_windows` (before the windows are merged; LPOSS's patch graph), `refine_canvas` (on the merged
map at the resized size; LPOSS+'s pixel graph) and `refine_output` (after the resize to the original
size; NACLIP's PAMR). The segmenter owns the merge between the first two and the resize before the
third.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ovseg.errors import ConfigError
from ovseg.runtime import module_device, module_dtype

from .options import choice, unknown_options
from .patches import (
    GRID_POLICIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    grid_size,
    prepare_images,
)
from .vocabulary import Vocabulary
from .windows import merge_windows

__all__ = [
    "Stage", "VLMPredictor", "FeatureExtractor", "Refiner", "prepare_images", "grid_size", "module_device",
    "module_dtype", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]


class Stage(nn.Module):
    """What every stage declares: patch size, whether its weights are random, and its options."""

    #: pixels per patch of the stage's grid (1 for stages that work on pixels or have no grid)
    patch_size: int = 1
    #: True when the weights are randomly initialised (smoke tests): every output says so
    random_weights: bool = False
    #: option names `configure` accepts; each is an attribute of the stage
    options: ClassVar[tuple[str, ...]] = ()

    def configure(self, **options: Any) -> None:
        """Set options (at construction and per dataset); a refused value leaves the stage as it was.

        Unknown names are errors that name only them (with the closest known name).
        """
        unknown_options(options, self.options, self.stage_name)
        previous = {name: getattr(self, name) for name in options if hasattr(self, name)}
        missing = [name for name in options if name not in previous]
        for name, value in options.items():
            setattr(self, name, value)
        try:
            self.check_options()
        except Exception as exc:
            for name, value in previous.items():
                setattr(self, name, value)
            for name in missing:
                delattr(self, name)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{self.stage_name}: bad option value in {options}: {exc}") from exc

    def check_options(self) -> None:
        """Validate the option attributes and store them in their canonical types (ConfigError if bad)."""

    def option_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.options if hasattr(self, name)}

    @property
    def stage_name(self) -> str:
        return type(self).__name__

    def extra_repr(self) -> str:
        values = ", ".join(f"{k}={v!r}" for k, v in self.option_values().items())
        return values + (", random_weights=True" if self.random_weights else "")


class VLMPredictor(Stage, ABC):
    """Per-name scores for a batch of windows (see the module docstring)."""

    #: patch-grid policy for windows that are not a multiple of the patch (see `ovseg.pipeline.patches`)
    grid: str = "pad"
    vocabulary: Vocabulary | None = None

    @abstractmethod
    def set_classes(self, vocabulary: Vocabulary | Sequence) -> None:
        """Encode and cache the text embeddings of every name of `vocabulary`."""

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(Q, D) unit text embeddings of the current vocabulary, in its name order."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its text embeddings")

    def set_image(self, image: torch.Tensor) -> None:
        """Called with each resized image (3, H, W) in [0, 1] before its windows; for methods with a
        whole-image term (CASS). Default: nothing."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (B, Q, h, w), float32, for float windows (B, 3, H, W) in [0, 1]."""

    def check_grid(self) -> None:
        self.grid = choice(self.grid, "grid", GRID_POLICIES, self.stage_name)


class FeatureExtractor(Stage, ABC):
    """Per-patch features (B, D, h, w) for affinities; L2-normalised unless `normalize` is False."""

    normalize: bool = True

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D, h, w) of float windows (B, 3, H, W) in [0, 1]."""


class Refiner(Stage):
    """Turns window scores into scores on the image (see the module docstring for the three steps)."""

    #: whether the segmenter must run a feature extractor for this refiner
    needs_features: bool = False

    def refine_windows(
        self, image: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, features: torch.Tensor | None
    ) -> torch.Tensor:
        """Window scores (W, Q, h, w) -> refined window scores (W, Q, h', w'), before the merge."""
        return scores

    def refine_canvas(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Merged scores (Q, H, W) on the resized image (3, H, W) -> refined (Q, H, W)."""
        return scores

    def refine_output(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores (Q, H0, W0) already resized to the original size -> refined; `image` is the resized image."""
        return scores

    def forward(self, image, boxes, scores, features=None) -> torch.Tensor:
        """The windows and canvas steps with the merge between them: (Q, H, W) on the resized image."""
        windows = self.refine_windows(image, boxes, scores, features)
        merged = merge_windows(windows.float(), boxes, image.shape[-2], image.shape[-1])
        return self.refine_canvas(image, merged)
